"""Fine-tuning numbers of issue 3, on the 2-core CPU:

    .venv/bin/python bench/finetune.py [--repeats 3] [--images 256] [--skip-runs]

1. Epoch time of a top-2-stage fine-tune (lite0, 224 px, batch 32): training the top on cached boundary
   activations against the plain way, a full forward from pixels plus the backward pass, on the same images.
   Pixels are decoded beforehand for the plain run, which flatters it.
2. `headstart train --strategy finetune` on flowers (80/20) and hymenoptera, and `--strategy auto` on flowers:
   validation accuracy, wall time and peak RSS, as a user runs them, each with cold feature and boundary caches
   (the backbone converted and exported once beforehand, as for `bench/core.py`).
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
from core import HS, print_table, run, score, split80  # noqa: E402


def epoch_times(images: list[Path], repeats: int) -> tuple[float, float]:
    """Seconds per image for one training step over `images`: (boundary-cached, plain full forward)."""
    import torch
    import torch.nn.functional as F

    from headstart.vision.augment import augmented_view
    from headstart.backbones.registry import resolve
    from headstart.data.imageio import load_rgb
    from headstart.runtime.frozen import FrozenBackbone
    from headstart.train.finetune import boundary_for, set_modes, set_trainable
    from headstart.heads.config import HeadConfig
    from headstart.heads.module import Head

    frozen = FrozenBackbone.pretrained(resolve("efficientnet_lite0"))
    cfg = frozen.spec.preprocess
    net = frozen.build_torch()
    boundary = boundary_for(net, 2)
    units = set_trainable(net, boundary)
    pixels = torch.from_numpy(np.stack([augmented_view(load_rgb(p), cfg, "light", i) for i, p in enumerate(images)]))
    # Both ways in channels_last, as training runs (the plain one gains from it too).
    net.to(memory_format=torch.channels_last)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        cached = [net.forward_bottom(pixels[s:s + 32], boundary) for s in range(0, len(pixels), 32)]
        head = Head(HeadConfig(net(pixels[:2]).shape[1], 5))
    params = [p for p in net.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as training does
    labels = torch.randint(0, 5, (len(images),))

    def step(feats: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def cached_epoch() -> None:
        for b, (h, taps) in enumerate(cached):
            # as in training: activations stored as float16 on disk, widened per batch
            h = h.half().float().contiguous(memory_format=torch.channels_last)
            step(net.forward_top(h, taps, boundary), labels[b * 32:(b + 1) * 32])

    def plain_epoch() -> None:
        for s in range(0, len(pixels), 32):
            step(net(pixels[s:s + 32]), labels[s:s + 32])

    set_modes(net, head, units, train_bn=False)
    out = []
    for fn in (cached_epoch, plain_epoch):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) / len(images))
        out.append(statistics.median(times))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--skip-runs", action="store_true", help="only the epoch-time comparison")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    flowers_src = args.data / "flowers"
    images = sorted(flowers_src.rglob("*.jpg"))[:: max(1, 4317 // args.images)][: args.images]
    cached_s, plain_s = epoch_times(images, args.repeats)
    n_train = 2763
    rows = [
        ("top-2 fine-tune, boundary cached: s/epoch (flowers train)", f"{cached_s * n_train:.0f}"),
        ("same epoch, full forward + backward: s/epoch", f"{plain_s * n_train:.0f}"),
        ("ratio cached / full (target <= 0.33)", f"{cached_s / plain_s:.2f}"),
    ]
    if not args.skip_runs:
        work = Path(tempfile.mkdtemp(prefix="headstart-ftbench-"))
        cache = work / "cache"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HEADSTART_CACHE": str(cache)}
        split80(flowers_src, work / "flowers")
        hym = args.data / "hymenoptera"
        run(HS + ["train", str(hym / "val"), "--out", str(work / "prime")], env)  # converts + exports once
        for label, data, val, extra in (
            ("flowers finetune", work / "flowers" / "train", work / "flowers" / "val", ["--strategy", "finetune"]),
            ("flowers auto", work / "flowers" / "train", work / "flowers" / "val", ["--strategy", "auto"]),
            ("hymenoptera finetune", hym / "train", hym / "val", ["--strategy", "finetune"]),
        ):
            out = work / label.replace(" ", "-")
            for computed in ("features", "boundary"):  # each run starts cold, as a user's first run does
                shutil.rmtree(cache / computed, ignore_errors=True)
            wall, rss = run(HS + ["train", str(data), "--out", str(out), *extra], env)
            rows.append((f"{label}: val accuracy / wall s / peak RSS MiB",
                         f"{score(out, val, env):.4f} / {wall:.0f} / {rss:.0f}"))
    print_table(rows, f"epoch times: medians of {args.repeats}, {len(images)} images")


if __name__ == "__main__":
    main()
