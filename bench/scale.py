"""Issue 15's scale numbers: `headstart train` (head) and `headstart predict --format csv` on a large synthetic set,
against the same figures on a small one, as a user runs them (the CLI in fresh processes).

    .venv/bin/python bench/scale.py [--n 100000] [--small 4000] [--data /tmp/headstart-scale]
                                    [--backbone test_efficientnet] [--weights FILE] [--commands train,predict]

Generates --n and --small JPEGs (64-96 px, --classes colour classes with noise and a darker blob: learnable,
no two alike; seeded, so a set once made is reused), then for each size runs, under /usr/bin/time semantics
(os.wait4: wall, user+sys CPU, peak RSS of the child):

    headstart train DATA --out M --strategy head      (a cold feature cache: its features folder is emptied first)
    headstart predict M DATA --format csv > file      (predict extracts on its own: no cache)

and prints images, seconds, images/s and peak RSS per row, then the N/small ratios. The backbone's ONNX export is
made once beforehand (a warm-up train on a few images, not counted). The default backbone is timm's tiny
`test_efficientnet` with seeded random weights (made here as tests/conftest.py makes them): it measures the
pipeline's own memory and throughput (scan, hashing, decoding, cache, head, CSV) in minutes; pass
`--backbone efficientnet_lite0` (no --weights) for the real model at a size the machine allows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HS = str(ROOT / ".venv" / "bin" / "headstart")
TINY = "test_efficientnet"
COLOURS = [(200, 60, 50), (60, 170, 70), (60, 80, 200), (210, 190, 60), (170, 70, 180), (60, 180, 190)]


@dataclass(frozen=True)
class Row:
    command: str
    backbone: str
    images: int
    wall_s: float
    cpu_s: float
    rss_mib: float

    @property
    def per_s(self) -> float:
        return self.images / self.wall_s


# --- the data ------------------------------------------------------------------------------------------------


def _write_range(folder: str, start: int, stop: int, classes: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    for i in range(start, stop):
        cls = i % classes
        path = Path(folder) / f"c{cls}" / f"img_{i:07d}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])  # per image: a set is the same however it is cut into workers
        w, h = int(rng.integers(64, 97)), int(rng.integers(64, 97))
        arr = np.empty((h, w, 3), np.float32)
        arr[:] = np.asarray(COLOURS[cls % len(COLOURS)], np.float32) * rng.uniform(0.75, 1.15)
        arr += rng.normal(0.0, 20.0, size=arr.shape)
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, 24)
        yy, xx = np.ogrid[:h, :w]
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] *= 0.55
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(tmp, "JPEG", quality=85)
        os.replace(tmp, path)  # a killed generator leaves no half-written image that would be taken as made


def make_set(folder: Path, n: int, classes: int, seed: int, workers: int) -> Path:
    """folder/c<k>/img_NNNNNNN.jpg for n images, reused when its marker says it is complete."""
    marker = folder / ".complete"
    if marker.exists() and marker.read_text().strip() == f"{n} {classes} {seed}":
        return folder
    for k in range(classes):
        (folder / f"c{k}").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step = 2000
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_range, *zip(*[(str(folder), s, min(s + step, n), classes, seed)
                                           for s in range(0, n, step)])))
    marker.write_text(f"{n} {classes} {seed}\n")
    print(f"made {n} images in {folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return folder


def tiny_weights(path: Path) -> Path:
    """Seeded random weights for the tiny backbone, as tests/conftest.py's tiny_weights fixture makes them."""
    if path.exists():
        return path
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False, num_classes=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# --- the runs ------------------------------------------------------------------------------------------------


def measure(args: list[str], env: dict, stdout: Path | None = None) -> tuple[float, float, float]:
    """Wall seconds, user+sys CPU seconds and peak RSS (MiB) of one child process."""
    t0 = time.perf_counter()
    with open(stdout or os.devnull, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.PIPE)
        err = proc.stderr.read()  # drained as it runs: a chatty child never blocks on a full pipe
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(args)}\n{err.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def run_size(data: Path, n: int, work: Path, env: dict, flags: list[str], backbone: str,
             commands: list[str], predict_model: Path | None = None) -> list[Row]:
    model = work / f"model-{backbone}-{n}"
    rows = []
    if "train" in commands or (predict_model is None and not (model / "headstart.json").exists()):
        shutil.rmtree(Path(env["HEADSTART_CACHE"]) / "features", ignore_errors=True)  # a cold feature cache
        shutil.rmtree(model, ignore_errors=True)
        wall, cpu, rss = measure([HS, "train", str(data), "--out", str(model), "--strategy", "head", *flags], env)
        rows.append(Row("train (head)", backbone, n, wall, cpu, rss))
    if "predict" in commands:
        out = work / f"predict-{backbone}-{n}.csv"
        wall, cpu, rss = measure([HS, "predict", str(predict_model or model), str(data), "--format", "csv"], env,
                                 stdout=out)
        with open(out) as f:
            lines = sum(1 for _ in f) - 1
        if lines != n:
            sys.exit(f"predict wrote {lines} rows for {n} images")
        rows.append(Row("predict --format csv", backbone, n, wall, cpu, rss))
    return rows


def table(rows: list[Row]) -> str:
    head = f"{'command':<22}{'backbone':<20}{'images':>8}{'wall s':>9}{'cpu s':>9}{'img/s':>8}{'peak RSS MiB':>14}"
    lines = [head, "-" * len(head)]
    lines += [f"{r.command:<22}{r.backbone:<20}{r.images:>8}{r.wall_s:>9.1f}{r.cpu_s:>9.1f}{r.per_s:>8.1f}"
              f"{r.rss_mib:>14.0f}" for r in rows]
    by = {(r.command, r.backbone, r.images): r for r in rows}
    sizes = sorted({r.images for r in rows})
    if len(sizes) == 2:
        small, big = sizes
        for r in rows:
            s = by.get((r.command, r.backbone, small))
            if r.images == big and s:
                lines.append(f"{r.command:<22}{r.backbone:<20}{'ratio':>8}  {big}/{small}: images/s x"
                             f"{r.per_s / s.per_s:.2f} (cpu x{(r.images / r.cpu_s) / (s.images / s.cpu_s):.2f}), "
                             f"peak RSS x{r.rss_mib / s.rss_mib:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="images in the large set")
    ap.add_argument("--small", type=int, default=4000, help="images in the small set to compare with (0: none)")
    ap.add_argument("--data", type=Path, default=Path("/tmp/headstart-scale"), help="where the sets are made")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default=TINY)
    ap.add_argument("--weights", type=Path, default=None, help=f"backbone weights (made for {TINY} when not given)")
    ap.add_argument("--commands", default="train,predict", help="train, predict or both")
    ap.add_argument("--predict-model", type=Path, default=None,
                    help="predict with this model at every size (so predict can run beside a train of the same set)")
    ap.add_argument("--seed-cache", type=Path, default=Path.home() / ".cache" / "headstart",
                    help="a headstart cache whose converted weights and ONNX exports the bench's own cache starts "
                         "with (never its features), so the real backbone needs no download or export")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes generating images")
    args = ap.parse_args()
    commands = args.commands.split(",")

    weights = args.weights or (tiny_weights(args.data / "tiny.safetensors") if args.backbone == TINY else None)
    flags = ["--backbone", args.backbone, "--device", "cpu"] + (["--weights", str(weights)] if weights else [])
    work = args.data / "runs"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HEADSTART_CACHE": str(args.data / f"cache-{args.backbone}"), "HF_HUB_OFFLINE": "1"}
    for folder in ("weights", "onnx"):
        src, dst = args.seed_cache / folder, Path(env["HEADSTART_CACHE"]) / folder
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)
    sizes = [s for s in (args.small, args.n) if s]
    sets = {n: make_set(args.data / f"n{n}-c{args.classes}-s{args.seed}", n, args.classes, args.seed, args.workers)
            for n in sizes}
    warm = make_set(args.data / f"n64-c{args.classes}-s{args.seed}", 64, args.classes, args.seed, 1)
    if not (work / "warm" / "headstart.json").exists():  # the backbone's export, once, not counted
        measure([HS, "train", str(warm), "--out", str(work / "warm"), "--strategy", "head", *flags], env)
    rows = []
    for n in sizes:
        rows += run_size(sets[n], n, work, env, flags, args.backbone, commands, args.predict_model)
        print(table(rows), file=sys.stderr, flush=True)  # so far, in case a later size is cut short
    print(f"# {os.cpu_count()} CPUs, shared with other work while measured; images/s = images / wall seconds")
    print(table(rows))


if __name__ == "__main__":
    main()
