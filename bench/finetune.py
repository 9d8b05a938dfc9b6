"""Fine-tuning numbers (issues 3 and 16), on the 2-core CPU; every figure printed is measured in this run:

    .venv/bin/python bench/finetune.py [--repeats 3] [--images 256] [--unfreeze all --size 128] [--skip-runs]
                                       [--runs 1] [--sets flowers,flowers-auto,hymenoptera] [-- extra train flags]

1. One epoch over `--images` flowers photos (printed for those images, never scaled to a training set's size):
   stage 2's own epoch (`finetune._train_epoch`) reading a boundary store that was filled on disk and is read
   memory-mapped through `StoreArray`, exactly as training reads it (8-bit pixels normalised per batch when every
   stage trains), against the plain way on the same images: a full forward from pixels already decoded and
   normalised in memory, plus the backward pass (which flatters the plain way). Wall and CPU seconds, medians of
   `--repeats` epochs after one warm-up epoch; the store's fill is timed once.
   Defaults: the flowers setting, every stage at 128 px; `--unfreeze 2 --size 224` is the standard-size one.
2. `headstart train` as a user runs it, each run with cold feature and boundary caches (the backbone converted
   and exported once beforehand, not counted): validation accuracy, wall seconds, user+sys CPU seconds and peak
   RSS of the child process. With `--runs N` each figure is the median of N runs (N=1: a single run, said so).
   Flags after `--` go to every `headstart train` (e.g. `-- --finetune-epochs 4 --views 4`) to compare settings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from core import HS, measured, print_table, score, split80  # noqa: E402


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def epoch_times(images: list[Path], repeats: int, unfreeze: int | str, size: int, work: Path) -> dict:
    """One training epoch over `images`, from the boundary store as stage 2 reads it and the plain way."""
    from dataclasses import replace

    import torch
    import torch.nn.functional as F

    from headstart.backbones.registry import resolve
    from headstart.cache.boundary import BoundaryStore, bottom_engine
    from headstart.data.imageio import load_rgb
    from headstart.heads.config import HeadConfig
    from headstart.heads.module import Head
    from headstart.records import FinetuneConfig
    from headstart.runtime.frozen import FrozenBackbone
    from headstart.train import finetune as ft
    from headstart.train.loop import BestTracker
    from headstart.vision.augment import augmented_view, view_seed

    spec = resolve("efficientnet_lite0")
    pre = replace(spec.preprocess, input_size=size, crop_pct=1.0 if size != spec.preprocess.input_size else
                  spec.preprocess.crop_pct)
    frozen = FrozenBackbone.pretrained(replace(spec, preprocess=pre))
    cfg = FinetuneConfig(unfreeze=unfreeze, views=1)
    net = frozen.build_torch()
    boundary = ft.boundary_for(net, unfreeze)
    labels = np.arange(len(images)) % 5

    store = BoundaryStore(dict(bench="finetune", size=size, boundary=boundary, n=len(images)), work / "store")
    engine = bottom_engine(net, boundary, frozen.weights_id, pre)
    t0 = time.perf_counter()
    store.fill("train", images, 1, "light", 0, pre, engine)
    fill_s = time.perf_counter() - t0
    acts, taps, ok = store.arrays("train", pre)
    train = ft.StoredViews(acts, taps, labels)

    # The plain way: the same augmented views (seeds as the store's), decoded and normalised beforehand.
    pixels = torch.from_numpy(np.stack([augmented_view(load_rgb(p), pre, "light", view_seed(0, i, 0))
                                        for i, p in enumerate(images)])).contiguous(memory_format=torch.channels_last)
    y_all = torch.from_numpy(labels)
    place = ft._Placement(cfg)
    place.module(net)
    with torch.no_grad():
        head = place.module(Head(HeadConfig(net.eval()(pixels[:2]).shape[1], 5)))
    units = ft.set_trainable(net, boundary)
    loop = ft._Loop(*ft._optimizer(net, head, units, cfg, len(images)), np.random.default_rng(0),
                    keep=BestTracker(), patience=BestTracker(patience=cfg.stop_after))

    def cached_epoch() -> None:
        ft.set_modes(net, head, units, cfg.train_bn)
        ft._train_epoch(net, head, boundary, cfg, train, 0, loop, place)

    def plain_epoch() -> None:
        ft.set_modes(net, head, units, cfg.train_bn)
        for s in range(0, len(pixels), cfg.batch_size):
            loss = F.cross_entropy(head(net(pixels[s:s + cfg.batch_size])), y_all[s:s + cfg.batch_size],
                                   label_smoothing=cfg.label_smoothing)
            loop.opt.zero_grad(set_to_none=True)
            loss.backward()
            loop.opt.step()

    cached = _timed(cached_epoch, repeats)
    plain = _timed(plain_epoch, repeats)
    return dict(fill_s=fill_s, cached=cached, plain=plain, boundary=boundary, dtype=str(acts.raw.dtype))


def _median(values: list[float]) -> float:
    return statistics.median(values)


def train_runs(args, work: Path, extra: list[str]) -> list[tuple[str, str]]:
    cache = work / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HEADSTART_CACHE": str(cache)}
    flowers, hym = args.data / "flowers", args.data / "hymenoptera"
    split80(flowers, work / "flowers")
    measured(HS + ["train", str(hym / "val"), "--out", str(work / "prime")], env)  # converts + exports once
    sets = {
        "flowers": (work / "flowers" / "train", work / "flowers" / "val", ["--strategy", "finetune"]),
        "flowers-auto": (work / "flowers" / "train", work / "flowers" / "val", ["--strategy", "auto"]),
        "hymenoptera": (hym / "train", hym / "val", ["--strategy", "finetune"]),
    }
    rows = []
    for label in args.sets.split(","):
        data, val, flags = sets[label]
        got = []
        for r in range(args.runs):
            out = work / f"{label}-{r}"
            for computed in ("features", "boundary"):  # each run starts cold, as a user's first run does
                shutil.rmtree(cache / computed, ignore_errors=True)
            wall, cpu, rss = measured(HS + ["train", str(data), "--out", str(out), *flags, *extra], env)
            got.append((score(out, val, env), wall, cpu, rss))
        acc, wall, cpu, rss = (_median([g[i] for g in got]) for i in range(4))
        how = "single run" if args.runs == 1 else f"medians of {args.runs}"
        rows.append((f"{label} {' '.join(flags + extra)}: val acc / wall s / CPU s / peak RSS MiB ({how})",
                     f"{acc:.4f} / {wall:.0f} / {cpu:.0f} / {rss:.0f}"))
    return rows


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--unfreeze", default="all", help="'all' or a number of top stages, as --unfreeze")
    ap.add_argument("--size", type=int, default=128, help="input side: 128 is flowers' own (what training uses)")
    ap.add_argument("--skip-runs", action="store_true", help="only the epoch-time comparison")
    ap.add_argument("--runs", type=int, default=1, help="headstart train runs per set (figures: their medians)")
    ap.add_argument("--sets", default="flowers,flowers-auto,hymenoptera")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    unfreeze = args.unfreeze if args.unfreeze == "all" else int(args.unfreeze)
    work = Path(tempfile.mkdtemp(prefix="headstart-ftbench-"))
    os.environ.setdefault("HEADSTART_CACHE", str(work / "cache"))
    try:
        images = sorted((args.data / "flowers").rglob("*.jpg"))
        images = images[:: max(1, len(images) // args.images)][: args.images]
        t = epoch_times(images, args.repeats, unfreeze, args.size, work)
        n = len(images)
        (cw, cc), (pw, pc) = t["cached"], t["plain"]
        rows = [
            (f"boundary store: {n} images x 1 view, stage {t['boundary']} up trains, {t['dtype']}: fill s",
             f"{t['fill_s']:.1f}"),
            (f"epoch of {n} images from the store (memory-mapped, as training reads it): wall s / CPU s",
             f"{cw:.1f} / {cc:.1f}"),
            ("same epoch, full forward + backward from pixels in memory: wall s / CPU s", f"{pw:.1f} / {pc:.1f}"),
            ("ratio store / full, CPU (target <= 0.33 when the bottom is frozen)", f"{cc / pc:.2f}"),
        ]
        if not args.skip_runs:
            rows += train_runs(args, work, extra)
        print_table(rows, f"epoch times: medians of {args.repeats} epochs after a warm-up, {args.size} px, "
                          f"--unfreeze {args.unfreeze}; the machine may be shared: compare CPU seconds")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
