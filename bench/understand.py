"""Bench of `check`, `compare` and the label-error ranking on ../shared/data; every figure is measured in this run.

    .venv/bin/python bench/understand.py [--data ../shared/data] [--work /tmp/headstart-understand]

1. `headstart check` on flowers with a warm feature cache (warmed first by `check --deep`): seconds, goal <= 15.
2. `headstart compare` of lite0/1/2 on hymenoptera/train: the table, and whether each backbone's cross-validated
   accuracy interval holds the validation accuracy of a separate `train` (and its accuracy on hymenoptera/val).
3. Label errors: copies (symlinks) of hymenoptera/train and of flowers' 80/20 training split with 10 % of labels
   flipped at random (seeded): precision of the top 10 % of suspects, recall of flipped files in the top 15 %
   (goal >= 0.7 on hymenoptera).
4. The near-duplicate threshold: centred-feature cosine of edited copies against their originals, and of
   distinct photos, on hymenoptera/train (`headstart.tasks.check` documents these figures).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HS = [sys.executable, "-m", "headstart"]
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def run(*args: str | Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([*HS, *map(str, args)], capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))} failed: {proc.stderr[-800:]}")
    return time.perf_counter() - t0, proc.stdout


def split80(src: Path, dst: Path) -> Path:
    """acceptance.sh's split: every 5th file of each class (sorted) to val, by symlinks."""
    if not (dst / "train").exists():
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            for i, f in enumerate(sorted(os.listdir(cls))):
                part = dst / ("val" if i % 5 == 4 else "train") / cls.name
                part.mkdir(parents=True, exist_ok=True)
                (part / f).symlink_to(cls / f)
    return dst / "train"


def flipped_copy(src: Path, dst: Path, share: float = 0.1, seed: int = 0) -> set[Path]:
    """src/<class>/* as symlinks under dst, `share` of them (seeded) filed under another class; the flipped paths."""
    rng = np.random.default_rng(seed)
    shutil.rmtree(dst, ignore_errors=True)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    files = [(c, f) for c in classes for f in sorted(os.listdir(src / c))]
    flip = set(rng.choice(len(files), round(share * len(files)), replace=False).tolist())
    flipped = set()
    for i, (c, f) in enumerate(files):
        to = c if i not in flip else rng.choice([o for o in classes if o != c])
        (dst / to).mkdir(parents=True, exist_ok=True)
        (dst / to / f).symlink_to((src / c / f).resolve())
        if i in flip:
            flipped.add(dst / to / f)
    return flipped


def label_bench(name: str, folder: Path, flipped: set[Path]) -> None:
    from headstart.cache.dataset import dataset_features
    from headstart.data.scan import scan_folder
    from headstart.evaluate.labels import out_of_fold_linear, suspect_ranking
    from headstart.progress import NoProgress
    from headstart.runtime.frozen import FrozenBackbone
    from headstart.tasks.check import sized_spec

    t0 = time.perf_counter()
    dataset = scan_folder(folder)
    feats = dataset_features(dataset, FrozenBackbone.pretrained(sized_spec("efficientnet_lite0", dataset)), "auto",
                             NoProgress())
    # The linear heads `check` ranks with (`evaluate.labels.find_label_errors`), so these are check's figures.
    proba, _ = out_of_fold_linear(np.asarray(feats.features), feats.labels, len(dataset.classes))
    order, n_flagged = suspect_ranking(feats.labels, proba)
    is_flipped = np.array([p in flipped for p in feats.paths])
    top10, top15 = order[:round(0.10 * len(order))], order[:round(0.15 * len(order))]
    flagged_hits = is_flipped[order[:n_flagged]].sum()
    print(f"label errors, {name}: {len(order)} images, {is_flipped.sum()} flipped; top-10% precision "
          f"{is_flipped[top10].mean():.3f}, top-15% recall {is_flipped[top15].sum() / is_flipped.sum():.3f}; "
          f"cleanlab flags {n_flagged} ({flagged_hits} flipped); {feats.cached}/{len(order)} features cached; "
          f"{time.perf_counter() - t0:.1f} s")


def compare_bench(data: Path, work: Path) -> None:
    from headstart import ImageClassifier

    secs, table = run("compare", data / "hymenoptera/train", "--backbones", ",".join(BACKBONES))
    print(f"compare {','.join(BACKBONES)} on hymenoptera/train: {secs:.1f} s\n{table}")
    from headstart.tasks.compare import compare_backbones  # its figures, again from the caches just filled

    results = {r.backbone: r for r in compare_backbones(data / "hymenoptera/train", list(BACKBONES))}
    for name in BACKBONES:
        clf = ImageClassifier(backbone=name).fit(data / "hymenoptera/train")
        val = clf.val_metrics_.accuracy
        held = clf.score(data / "hymenoptera/val")
        cv = results[name].cv
        print(f"{name}: cv {cv.accuracy:.3f} [{cv.low:.3f}, {cv.high:.3f}]; train's val {val:.3f} "
              f"({'inside' if cv.contains(val) else 'OUTSIDE'}); hymenoptera/val {held:.3f} "
              f"({'inside' if cv.contains(held) else 'OUTSIDE'})")


def threshold_bench(data: Path) -> None:
    from PIL import Image, ImageEnhance

    from headstart.cache.dataset import dataset_features, path_features
    from headstart.data.scan import scan_folder
    from headstart.progress import NoProgress
    from headstart.runtime.frozen import FrozenBackbone
    from headstart.tasks.check import NEAR_DUPLICATE_COSINE, sized_spec

    ds = scan_folder(data / "hymenoptera/train")
    frozen = FrozenBackbone.pretrained(sized_spec("efficientnet_lite0", ds))
    feats = dataset_features(ds, frozen, "auto", NoProgress())
    x = np.asarray(feats.features)
    mean = x.mean(0)

    def unit(a: np.ndarray) -> np.ndarray:
        a = a - mean
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    u = unit(x)
    distinct = (u @ u.T)[np.triu_indices(len(u), 1)]
    t = NEAR_DUPLICATE_COSINE
    print(f"near-duplicates at cosine >= {t}: {int((distinct >= t).sum())} of {len(distinct)} distinct pairs "
          f"(max {distinct.max():.3f}, 99.9% below {np.quantile(distinct, 0.999):.3f})")
    picks = list(range(0, len(feats.paths), 12))
    edits = {"jpeg q50": lambda im: im, "half size": lambda im: im.resize((im.width // 2, im.height // 2)),
             "crop 10%": lambda im: im.crop((im.width // 20, im.height // 20, im.width - im.width // 20,
                                             im.height - im.height // 20)),
             "brighter 20%": lambda im: ImageEnhance.Brightness(im).enhance(1.2)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, edit in edits.items():
            paths = []
            for i in picks:
                path = Path(tmp) / f"{len(paths)}-{name.replace(' ', '_').replace('%', '')}.jpg"
                edit(Image.open(feats.paths[i]).convert("RGB")).save(path, quality=50 if name == "jpeg q50" else 90)
                paths.append(path)
            got = path_features(paths, np.zeros(len(paths), np.int64), np.array(["train"] * len(paths)), frozen,
                                "auto", NoProgress(), "edits")
            sims = (unit(np.asarray(got.features)) * u[picks]).sum(1)
            print(f"  {len(picks)} copies, {name:12s}: median {np.median(sims):.3f}, min {sims.min():.3f}, "
                  f"caught {np.mean(sims >= t):.0%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "headstart-understand")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: check,compare,labels,threshold")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    flowers = args.data / "flowers"
    if "check" not in skip:
        warm, _ = run("check", flowers, "--deep")  # extracts what is not cached yet: not the figure
        cpu0 = os.times()
        secs, out = run("check", flowers)
        cpu1 = os.times()
        cpu = cpu1.children_user - cpu0.children_user + cpu1.children_system - cpu0.children_system
        print(f"check flowers (warm cache): {secs:.1f} s wall, {cpu:.1f} s CPU (goal <= 15 s; warming run "
              f"{warm:.1f} s; the machine may be shared: the CPU seconds are the steadier figure)\n"
              f"{out.strip().splitlines()[-1]}")
    if "compare" not in skip:
        compare_bench(args.data, args.work)
    if "labels" not in skip:
        hym = flipped_copy(args.data / "hymenoptera/train", args.work / "hym-flipped")
        label_bench("hymenoptera/train", args.work / "hym-flipped", hym)
        train = split80(flowers, args.work / "flowers-split")
        fl = flipped_copy(train, args.work / "flowers-flipped")
        label_bench("flowers 80% split", args.work / "flowers-flipped", fl)
    if "threshold" not in skip:
        threshold_bench(args.data)


if __name__ == "__main__":
    main()
