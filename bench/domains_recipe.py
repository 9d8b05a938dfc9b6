"""The reference fine-tuning recipe of issue 26 as a plain script, beside headstart (no headstart training code:
only its bundled Lite0 weights and class-folder scan):

    .venv/bin/python bench/domains_recipe.py TRAIN_DIR VAL_DIR [--size 256] [--epochs 12] [--unfreeze all]

The whole photo resized to --size (no centre crop), every stage fine-tuned (or the top --unfreeze stages),
class-balanced sampling, flips both ways and 90-degree turns, brightness/contrast jitter, one-cycle AdamW, BatchNorm
frozen (inference mode), label smoothing 0.1. Trains on TRAIN_DIR, prints per epoch the training seconds and, at
the end, the held-out accuracy, balanced accuracy and per-class recall on VAL_DIR (nothing is chosen on it: the
last epoch is scored). One JSON line last, for bench/domains.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from headstart.backbones.pooled import PooledFeatures
from headstart.backbones.registry import resolve
from headstart.backbones.weights import create_model
from headstart.data.imageio import load_rgb
from headstart.data.scan import scan_folder


def load(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    ds = scan_folder(folder, val_split=0.0)
    pixels = [np.asarray(load_rgb(s.path).resize((size, size), Image.Resampling.BICUBIC)) for s in ds.samples]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    return x, torch.tensor([s.label for s in ds.samples]), list(ds.classes)


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    out = []
    for img in x:
        img = img.flip(-1) if rng.random() < 0.5 else img
        img = img.flip(-2) if rng.random() < 0.5 else img
        out.append(torch.rot90(img, int(rng.integers(4)), (-2, -1)))
    x = torch.stack(out).float()
    gain = torch.from_numpy(rng.uniform(0.8, 1.2, (len(x), 1, 1, 1))).float()
    shift = torch.from_numpy(rng.uniform(-20, 20, (len(x), 1, 1, 1))).float()
    return (x * gain + shift).clamp(0, 255)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("train", type=Path)
    ap.add_argument("val", type=Path)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--unfreeze", default="all")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    xt, yt, classes = load(a.train, a.size)
    xv, yv, _ = load(a.val, a.size)
    spec = resolve("efficientnet_lite0")
    mean = torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.preprocess.std).view(1, 3, 1, 1) * 255
    net = PooledFeatures(create_model(spec)).eval().to(memory_format=torch.channels_last)
    boundary = 0 if a.unfreeze == "all" else net.n_stages - int(a.unfreeze)
    for p in net.parameters():
        p.requires_grad_(False)
    units = net.trainable_units(boundary)
    for p in (p for u in units for p in u.parameters()):
        p.requires_grad_(True)
    with torch.no_grad():
        head = torch.nn.Linear(net(torch.zeros(1, 3, a.size, a.size)).shape[1], len(classes))
    groups = [{"params": head.parameters(), "lr": 1e-3}] + [{"params": u.parameters(), "lr": 5e-4} for u in units]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    batch, steps = 32, len(yt) // 32
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=a.epochs * steps,
                                                pct_start=0.25)
    weights = (1.0 / torch.bincount(yt).float())[yt]  # class-balanced sampling
    rng = np.random.default_rng(a.seed)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)

    for epoch in range(a.epochs):
        te = time.perf_counter()
        head.train()
        draw = torch.Generator().manual_seed(epoch)
        idx = torch.multinomial(weights, steps * batch, replacement=True, generator=draw)
        for s in range(0, len(idx), batch):
            rows = idx[s:s + batch]
            loss = F.cross_entropy(head(net(norm(augment(xt[rows], rng)))), yt[rows], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: {time.perf_counter() - te:.0f} s, last loss {loss.item():.3f}", flush=True)
    head.eval()
    with torch.no_grad():
        pred = torch.cat([head(net(norm(xv[s:s + 64]))).argmax(1) for s in range(0, len(yv), 64)]).numpy()
    y = yv.numpy()
    recall = [float((pred[y == c] == c).mean()) for c in range(len(classes))]
    result = dict(accuracy=float((pred == y).mean()), balanced=float(np.mean(recall)),
                  recall=dict(zip(classes, recall)), seconds=time.perf_counter() - t0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
