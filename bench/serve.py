"""Numbers of issue 13 (export, int8, serving), every one measured in this run:

    .venv/bin/python bench/serve.py [--data ../shared/data] [--load-s 30] [--work DIR]

- `predict` images/s with decoding on flowers (all of it) from model.onnx float and int8, against the cached-graph
  path (`serve.predictor.Predictor`: the backbone's cached ONNX export, the head in numpy), on a flowers model;
- int8 accuracy change on hymenoptera val (model trained on hymenoptera/train) and on the flowers 80/20 split,
  and whether the default tolerance would keep it; model sizes;
- `headstart serve` on 127.0.0.1: POST /predict latency for one image (p50, p95, sequential), then 8 concurrent
  clients for --load-s seconds (each client bounded to --max-requests): errors, p95, requests/s, server RSS
  before and after; once as served by default (one request per inference call) and once with waiting requests batched
  (--max-batch 32), which measured slower here;
- the same server under attack (`--mixed-only` runs just this, on the hymenoptera model): 8 normal clients alone
  for --load-s seconds (the baseline), then beside 8 clients sending pixel bombs (16 one-bit 7000 x 7000 PNGs, a
  96 kB request that decodes to 784 megapixels) and 8 slow ones (4 sending a header line a second, 4 a body at
  10 B/s, reconnecting when cut off): normal requests' errors and p95 against the baseline, what the bombs and the
  slow clients got, and the server's RSS at the start, its peak and 3 s after the load. Loopback only; every
  client is bounded by --load-s and --max-requests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HS = [str(ROOT / ".venv" / "bin" / "headstart")]
sys.path.insert(0, str(ROOT / "bench"))
from core import split80  # noqa: E402


def sh(args: list[str], env: dict) -> str:
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{out.stderr[-2000:]}")
    return out.stdout


def trained(data: Path, out: Path, env: dict) -> Path:
    if not (out / "headstart.json").is_file():
        sh([*HS, "train", str(data), "--out", str(out)], env)
    return out


def exports(model: Path, train: Path, val: Path) -> dict:
    """float and int8 exports of `model` side by side (float.onnx, int8.onnx), int8 written whatever its drop."""
    from headstart.serve.export import export_model
    from headstart.serve.export_quantize import INT8_MAX_DROP, quantize_int8

    t0 = time.perf_counter()
    report = export_model(model, train)
    export_s = time.perf_counter() - t0
    shutil.copy2(model / "model.onnx", model / "float.onnx")
    q = quantize_int8(model, train, max_drop=100.0, val=val, float_path=model / "float.onnx",
                      target=model / "int8.onnx")
    drop = (q.float_accuracy - q.int8_accuracy) * 100
    return dict(parity=report.parity, export_s=export_s, q=q, drop=drop, kept=drop <= INT8_MAX_DROP)


def images_per_s(kind: str, model: Path, folder: Path) -> tuple[float, int]:
    """One predict pass over `folder` (decoding included), after a warm-up on a few images."""
    from headstart.data.inputs import list_images

    paths, _ = list_images([folder])
    if kind == "cached graph":
        from headstart.runtime.frozen import FrozenBackbone
        from headstart.serve import artifact
        from headstart.serve.predictor import Predictor

        art = artifact.load(model)
        r = art.record
        frozen = FrozenBackbone(r.backbone, model / artifact.WEIGHTS_FILE, r.backbone_weights_id, "backbone.")
        predictor = Predictor(r.classes, frozen, r.head, art.head_state, "cpu")
    else:
        from headstart.serve.onnx_predictor import OnnxPredictor

        predictor = OnnxPredictor(model / f"{kind}.onnx")
    predictor.predict_table(paths[:16])
    t0 = time.perf_counter()
    rows = predictor.predict_table(paths)
    return len(rows) / (time.perf_counter() - t0), sum(r.error is None for r in rows)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str) -> None:
    """Until the server's /health answers 200 (at most ~60 s of refused connections)."""
    import httpx

    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def timed_posts(url: str, stop: float, max_requests: int, **post):
    """POST to `url`/predict with `post` (httpx's keywords) until `stop`, at most `max_requests` times: yields each
    (status, seconds), status 0 where the request failed."""
    import httpx

    with httpx.Client(timeout=30) as c:
        for _ in range(max_requests):
            if time.monotonic() > stop:
                return
            t0 = time.perf_counter()
            try:
                status = c.post(f"{url}/predict", **post).status_code
            except httpx.HTTPError:
                status = 0
            yield status, time.perf_counter() - t0


def post_photo(url: str, files: dict, stop: float, max_requests: int, lat: list[float], errors: list[int]) -> None:
    """One normal client: POST the photo until `stop` (at most `max_requests` times), each latency into `lat`
    and each failed or refused request counted in `errors[0]`."""
    for status, seconds in timed_posts(url, stop, max_requests, files=files):
        lat.append(seconds)
        errors[0] += status != 200


def normal_clients(url: str, files: dict, stop: float, max_requests: int, lat: list[float], errors: list[int],
                   n: int = 8) -> list[threading.Thread]:
    """`n` threads, each a `post_photo` client, sharing `lat` and `errors` (not started)."""
    return [threading.Thread(target=post_photo, args=(url, files, stop, max_requests, lat, errors)) for _ in range(n)]


def run_threads(threads: list[threading.Thread]) -> float:
    """Start them all, wait for them all; the seconds that took."""
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def serve_numbers(model: Path, photo: Path, env: dict, load_s: float, max_requests: int, max_batch: int) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*HS, "serve", str(model), "--port", str(port), "--max-batch", str(max_batch)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_healthy(url)
        body = photo.read_bytes()
        files = {"file": (photo.name, body, "image/jpeg")}
        with httpx.Client(timeout=30) as c:
            for _ in range(5):
                c.post(f"{url}/predict", files=files)  # warm-up
            single = []
            for _ in range(50):
                t0 = time.perf_counter()
                assert c.post(f"{url}/predict", files=files).status_code == 200
                single.append(time.perf_counter() - t0)
        rss_before = rss_mib(proc.pid)
        lat: list[float] = []
        errors = [0]
        stop = time.monotonic() + load_s
        wall = run_threads(normal_clients(url, files, stop, max_requests, lat, errors))
        return dict(p50=pct(single, 50) * 1000, p95=pct(single, 95) * 1000, n=len(lat), errors=errors[0],
                    load_p95=pct(lat, 95) * 1000, rps=len(lat) / wall, rss_before=rss_before,
                    rss_after=rss_mib(proc.pid), wall=wall)
    finally:
        proc.terminate()
        proc.wait(10)


def pixel_bomb_request() -> bytes:
    """The multipart body of 16 one-bit 7000 x 7000 PNGs in the field `file` (about 96 kB)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buf, "PNG")
    png = buf.getvalue()
    parts = b"".join(b'--bOmB\r\nContent-Disposition: form-data; name="file"; filename="bomb%d.png"\r\n'
                     b"Content-Type: image/png\r\n\r\n" % i + png + b"\r\n" for i in range(16))
    return parts + b"--bOmB--\r\n"


def slow_client(addr: tuple[str, int], stop: float, body: bool, cut: list[float]) -> None:
    """Until `stop`: a request whose headers (or body) trickle in, one line (10 bytes) a second; each time the
    server cuts it off, the seconds it took go to `cut` and it reconnects."""
    while time.monotonic() < stop:
        t0 = time.monotonic()
        try:
            with socket.create_connection(addr, timeout=5) as s:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n" + (
                    b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n"
                    b'--x\r\nContent-Disposition: form-data; name="file"; filename="slow.jpg"\r\n\r\n' if body
                    else b""))
                while time.monotonic() < stop:
                    s.sendall(b"0123456789" if body else b"X-Slow: 1\r\n")
                    time.sleep(1.0)
                return
        except OSError:  # cut off by the server
            cut.append(time.monotonic() - t0)
            time.sleep(0.1)


def mixed_load(model: Path, photo: Path, env: dict, load_s: float, max_requests: int) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = model.parent / "serve-mixed.log"
    proc = subprocess.Popen([*HS, "serve", str(model), "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=log_path.open("w"))
    files = {"file": (photo.name, photo.read_bytes(), "image/jpeg")}
    bomb = pixel_bomb_request()
    try:
        wait_until_healthy(url)
        with httpx.Client(timeout=30) as c:
            for _ in range(5):
                c.post(f"{url}/predict", files=files)  # warm-up
        rss: list[float] = [rss_mib(proc.pid)]

        def bombs(stop: float, statuses: list[int], took: list[float]) -> None:
            for status, seconds in timed_posts(url, stop, max_requests, content=bomb,
                                               headers={"content-type": "multipart/form-data; boundary=bOmB"}):
                statuses.append(status)
                took.append(seconds)

        def sample(stop: float) -> None:
            while time.monotonic() < stop + 1:
                rss.append(rss_mib(proc.pid))
                time.sleep(0.1)

        base_lat: list[float] = []
        base_err = [0]
        stop = time.monotonic() + load_s
        run_threads(normal_clients(url, files, stop, max_requests, base_lat, base_err))
        rss_start = rss_mib(proc.pid)
        lat: list[float] = []
        errors = [0]
        statuses: list[int] = []
        bomb_s: list[float] = []
        cut: dict[bool, list[float]] = {False: [], True: []}  # seconds until cut off: headers, body
        stop = time.monotonic() + load_s
        wall = run_threads(normal_clients(url, files, stop, max_requests, lat, errors)
                           + [threading.Thread(target=bombs, args=(stop, statuses, bomb_s)) for _ in range(8)]
                           + [threading.Thread(target=slow_client,
                                               args=(("127.0.0.1", port), stop, i % 2 == 1, cut[i % 2 == 1]))
                              for i in range(8)]
                           + [threading.Thread(target=sample, args=(stop,))])
        time.sleep(3)
        return dict(base_n=len(base_lat), base_errors=base_err[0], base_p95=pct(base_lat, 95) * 1000,
                    n=len(lat), errors=errors[0], p50=pct(lat, 50) * 1000, p95=pct(lat, 95) * 1000,
                    bombs=len(statuses), bomb_413=statuses.count(413), bomb_p95=pct(bomb_s, 95) * 1000,
                    cut={k: (len(v), statistics.median(v) if v else float("nan")) for k, v in cut.items()}, wall=wall,
                    rss_first=rss[0], rss_start=rss_start, rss_peak=max(rss), rss_final=rss_mib(proc.pid))
    finally:
        proc.terminate()
        proc.wait(10)
        log_lines = [line for line in log_path.read_text().splitlines() if line.strip()]
        print(f"server log: {len(log_lines)} lines, {sum('Traceback' in line for line in log_lines)} tracebacks; "
              f"first: {log_lines[:2]}", file=sys.stderr)


def mixed_rows(m: dict) -> list[tuple[str, str]]:
    ratio = m["p95"] / m["base_p95"]
    return [
        ("8 normal clients alone (baseline)", f"{m['base_n']} requests, {m['base_errors']} errors, "
                                             f"p95 {m['base_p95']:.0f} ms"),
        (f"same + 8 bomb + 8 slow clients, {m['wall']:.0f} s", f"normal: {m['n']} requests, {m['errors']} errors, "
         f"p50 {m['p50']:.0f} ms, p95 {m['p95']:.0f} ms ({ratio:.2f}x the baseline)"),
        ("  pixel bombs (16 x 7000 x 7000 1-bit PNG, 96 kB)",
         f"{m['bombs']} sent, {m['bomb_413']} answered 413, p95 {m['bomb_p95']:.0f} ms"),
        ("  4 slow clients: a header line a second", "cut off {} times, median after {:.1f} s".format(*m["cut"][False])),
        ("  4 slow clients: a body at 10 B/s", "cut off {} times, median after {:.1f} s".format(*m["cut"][True])),
        ("  server RSS", f"{m['rss_first']:.0f} MiB at start, {m['rss_start']:.0f} before the attack, "
                         f"peak {m['rss_peak']:.0f}, {m['rss_final']:.0f} 3 s after"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/headstart-bench-serve"))
    ap.add_argument("--load-s", type=float, default=30.0)
    ap.add_argument("--max-requests", type=int, default=5000, help="bound on each load client's requests")
    ap.add_argument("--mixed-only", action="store_true", help="only the mixed load (normal, bomb, slow clients)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HEADSTART_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    os.environ.update(HEADSTART_CACHE=env["HEADSTART_CACHE"], HF_HUB_OFFLINE="1")
    hym, flowers = args.data / "hymenoptera", args.data / "flowers"
    if args.mixed_only:
        model = trained(hym / "train", work / "hym", env)
        if not (model / "model.onnx").is_file():
            sh([*HS, "export", str(model)], env)
        photo = sorted((hym / "val" / "bees").glob("*.jpg"))[0]
        print_rows(mixed_rows(mixed_load(model, photo, env, args.load_s, args.max_requests)))
        return
    split = work / "flowers-split"
    if not (split / "train").is_dir():
        split80(flowers, split)
    hym_model = trained(hym / "train", work / "hym", env)
    fl_model = trained(split / "train", work / "flowers", env)
    rows = []
    ex = {}
    for name, model, train, val in (("hymenoptera", hym_model, hym / "train", hym / "val"),
                                    ("flowers 80/20", fl_model, split / "train", split / "val")):
        e = ex[name] = exports(model, train, val)
        q = e["q"]
        rows += [
            (f"{name}: export parity", f"max |Δprob| {e['parity'].max_dprob:.1e}, top-1 agreement "
             f"{e['parity'].top1_agreement:.0%} on {e['parity'].n_images} {e['parity'].source}"),
            (f"{name}: int8 accuracy (val, n={q.n_val})", f"{q.float_accuracy:.4f} -> {q.int8_accuracy:.4f} "
             f"({-e['drop']:+.2f} points; default tolerance {'keeps' if e['kept'] else 'refuses'} it)"),
            (f"{name}: model size", f"float {q.float_bytes / 2**20:.1f} MiB, int8 {q.int8_bytes / 2**20:.1f} MiB"),
        ]
    native = ex["flowers 80/20"]["parity"]
    from headstart.serve.onnx_predictor import OnnxPredictor

    views = ", ".join(f"{v.size} px" for v in OnnxPredictor(fl_model / "float.onnx").info.views)
    speeds = {kind: images_per_s(kind, fl_model, flowers) for kind in ("cached graph", "float", "int8")}
    for kind, (ips, n) in speeds.items():
        rows.append((f"predict flowers ({n} images, views {views}): {kind}", f"{ips:.1f} images/s"))
    photo = sorted((hym / "val" / "bees").glob("*.jpg"))[0]
    shutil.copy2(hym_model / "float.onnx", hym_model / "model.onnx")
    for max_batch in (1, 32):
        s = serve_numbers(hym_model, photo, env, args.load_s if max_batch == 1 else args.load_s / 2,
                          args.max_requests, max_batch)
        tag = "batched (--max-batch 32)" if max_batch > 1 else "one request per inference (default)"
        if max_batch == 1:
            rows.append(("POST /predict, 1 image, sequential", f"p50 {s['p50']:.1f} ms, p95 {s['p95']:.1f} ms"))
        rows.append((f"load 8 clients x {s['wall']:.0f} s, {tag}",
                     f"{s['n']} requests, {s['errors']} errors, p95 {s['load_p95']:.0f} ms, {s['rps']:.1f} req/s, "
                     f"server RSS {s['rss_before']:.0f} -> {s['rss_after']:.0f} MiB"))
    del native
    rows += mixed_rows(mixed_load(hym_model, photo, env, args.load_s, args.max_requests))
    print_rows(rows)


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"{'measure'.ljust(width)}  value")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    main()
