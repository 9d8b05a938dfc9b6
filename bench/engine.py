"""Extraction engines side by side (issue 16 part 1), measured as a user meets them: `headstart train` in fresh
processes, each engine with its own cache.

    .venv/bin/python bench/engine.py [--repeats 3] [--engines fp32,int8] [--data ../shared/data]

Per engine: a train on hymenoptera/train (which also makes the engine's export and, for int8, its one calibration,
on those photos) scored on hymenoptera/val; the engine alone (Lite0, 224 px, batch 32 of flowers photos, median
of 7 runs, in a child process); then --repeats cold-feature trains on flowers' 80 % split (the
acceptance check's split80, absolute paths), engines interleaved so that they share the machine's noise, each
scored on the 20 %. Prints, per engine: flowers extraction images/s (the train's own features_s, decoding and
both views included), the whole train's wall and CPU seconds, and both accuracies. Times are medians over the
repeats; every figure comes from this run. The machine may be shared: CPU seconds are the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import HS, ROOT, measured, score, split80  # noqa: E402  (bench/ is not a package)


@dataclass
class Runs:
    """One engine's measurements."""

    hym_acc: float = 0.0
    flowers_acc: list[float] = field(default_factory=list)
    images_per_s: list[float] = field(default_factory=list)
    model_images_per_s: float = 0.0
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)


def train(data: Path, out: Path, engine: str, env: dict) -> tuple[float, float, dict]:
    """Wall and CPU seconds of one `headstart train`, and the saved model's record."""
    args = [*HS, "train", str(data), "--engine", engine, "--out", str(out)]
    wall, cpu, _ = measured(args, env)
    return wall, cpu, json.loads((out / "headstart.json").read_text())


def model_only(engine: str, photos: list[Path], repeats: int = 7) -> float:
    """Images/s of the engine alone (Lite0 at 224 px, the standard view, batch 32), median of `repeats` runs after
    one warm-up: run in a child whose cache already holds the engine's export (and int8's calibration)."""
    import time

    import numpy as np

    from headstart.backbones.registry import resolve
    from headstart.runtime.frozen import FrozenBackbone
    from headstart.vision.preprocess import load_views

    spec = resolve("efficientnet_lite0")
    run = FrozenBackbone.pretrained(spec).with_engine(engine).engine("cpu")
    batch = np.stack([load_views(p, spec.preprocess)[0] for p in photos[:32]])
    run(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t0)
    return len(batch) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="fp32,int8")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--model-only", help=argparse.SUPPRESS)  # the child that times one engine alone
    args = ap.parse_args()
    if args.model_only:
        photos = sorted((args.data / "flowers").rglob("*.jpg"))[::100]
        print(f"{model_only(args.model_only, photos):.1f}")
        return
    data = args.data.resolve()
    engines = args.engines.split(",")
    work = Path(tempfile.mkdtemp(prefix="headstart-bench-engine-"))
    runs = {e: Runs() for e in engines}
    env = {e: {**os.environ, "HEADSTART_CACHE": str(work / f"cache-{e}"), "HF_HUB_OFFLINE": "1"} for e in engines}
    try:
        split80(data / "flowers", work / "flowers")
        n_train = sum(1 for _ in (work / "flowers" / "train").rglob("*") if _.is_symlink())
        for e in engines:  # exports and int8's calibration happen here, outside the timed runs
            train(data / "hymenoptera" / "train", work / f"hym-{e}", e, env[e])
            runs[e].hym_acc = score(work / f"hym-{e}", data / "hymenoptera" / "val", env[e])
            child = subprocess.run([sys.executable, __file__, "--model-only", e, "--data", str(data)], env=env[e],
                                   capture_output=True, text=True, check=True)
            runs[e].model_images_per_s = float(child.stdout.split()[-1])
        for rep in range(args.repeats):
            for e in engines:
                shutil.rmtree(work / f"cache-{e}" / "features", ignore_errors=True)  # cold features, warm export
                out = work / f"flowers-{e}-{rep}"
                wall, cpu, record = train(work / "flowers" / "train", out, e, env[e])
                r = runs[e]
                r.wall_s.append(wall)
                r.cpu_s.append(cpu)
                r.images_per_s.append(n_train / record["fit"]["timings"]["features_s"])
                r.flowers_acc.append(score(out, work / "flowers" / "val", env[e]))
                print(f"  rep {rep + 1} {e}: {wall:.1f} s wall, {cpu:.1f} s CPU, {r.images_per_s[-1]:.1f} img/s, "
                      f"flowers val {r.flowers_acc[-1]:.4f}", file=sys.stderr, flush=True)
        report(runs, engines, n_train, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(runs: dict[str, Runs], engines: list[str], n_train: int, repeats: int) -> None:
    med = statistics.median
    base = runs[engines[0]]
    print(f"engines on flowers (80 % split: {n_train} training photos, 224 px + 128 px native view), cold features,"
          f" medians of {repeats}; the machine was shared with other work")
    print(f"{'engine':8} {'model img/s':>11} {'extract img/s':>13} {'train wall s':>12} {'train CPU s':>11} {'speed-up (wall/CPU)':>19} "
          f"{'flowers val':>11} {'hymenoptera val':>15}")
    for e in engines:
        r = runs[e]
        up = f"{med(base.wall_s) / med(r.wall_s):.2f}x / {med(base.cpu_s) / med(r.cpu_s):.2f}x"
        accs = sorted(set(round(a, 4) for a in r.flowers_acc))
        acc = f"{accs[0]:.4f}" if len(accs) == 1 else "/".join(f"{a:.4f}" for a in accs)
        print(f"{e:8} {r.model_images_per_s:11.1f} {med(r.images_per_s):13.1f} {med(r.wall_s):12.1f} {med(r.cpu_s):11.1f} {up:>19} "
              f"{acc:>11} {r.hym_acc:15.4f}")


if __name__ == "__main__":
    main()
