"""Multi-label defaults on planet_sample against the linear probe, and against a single-label train of the same size.

    .venv/bin/python bench/multilabel.py [--seed 0] [--repeats 1] [--work /tmp/headstart-bench-ml]

A seeded 80/20 split of `../shared/data/planet_sample` (iterative stratification, `data.multilabel`) is written as
two manifests. `headstart train --manifest train.csv` (the defaults) runs in a subprocess under /usr/bin/time (wall
seconds, peak RSS): once on a cold feature cache (a copy of the cache's converted and exported backbone, no
features), then `--repeats` times warm. The single-label twin trains on the same 800 chips labelled by their one
weather tag (clear, cloudy, haze or partly_cloudy: every chip has exactly one), cold and warm the same way, for the
"as fast as a single-label model of the same size" goal. Scores are on the 200
held-out chips: mAP (macro over labels with a positive), macro F1, micro F1 and subset accuracy of the saved model
(`ImageClassifier.load(...).evaluate(test.csv)`), and of the linear probe: a one-vs-rest logistic regression
(scikit-learn, C=0.01, standardised inputs, threshold 0.5) on the same backbone's pooled features, as the model's
own engine computes them. Fine-tuning is not available for multi-label models yet: the line says so.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "planet_sample"
WEATHER = ("clear", "cloudy", "haze", "partly_cloudy")


def write_split(work: Path, seed: int) -> tuple[Path, Path, Path]:
    """train.csv / test.csv (path,labels) and single.csv (path,label: the weather tag) of a seeded 80/20 split."""
    from headstart.data.multilabel import read_multilabel, stratified_pick

    data = read_multilabel(DATA / "labels.csv", val_split=0.0)
    test = set(stratified_pick(data.targets, 0.2, seed).tolist())
    work.mkdir(parents=True, exist_ok=True)
    out = {name: open(work / name, "w", newline="") for name in ("train.csv", "test.csv", "single.csv")}
    writers = {name: csv.writer(f) for name, f in out.items()}
    writers["train.csv"].writerow(["path", "labels"])
    writers["test.csv"].writerow(["path", "labels"])
    writers["single.csv"].writerow(["path", "label"])
    for i, (path, row) in enumerate(zip(data.paths, data.targets)):
        labels = [c for c, on in zip(data.classes, row) if on]
        writers["test.csv" if i in test else "train.csv"].writerow([path, ";".join(labels)])
        if i not in test:
            weather = [c for c in labels if c in WEATHER]
            writers["single.csv"].writerow([path, weather[0] if weather else "none"])
    for f in out.values():
        f.close()
    return work / "train.csv", work / "test.csv", work / "single.csv"


def cold_env(env: dict, where: Path) -> dict:
    """`env` with HEADSTART_CACHE at a fresh copy of the current cache's backbone files (its converted weights and
    ONNX exports, int8 calibration included) and no features: a first train on these photos, minus the one-time
    backbone export."""
    from headstart.paths import cache_root

    shutil.rmtree(where, ignore_errors=True)
    for part in ("weights", "onnx"):
        if (cache_root() / part).is_dir():
            shutil.copytree(cache_root() / part, where / part)
    return {**env, "HEADSTART_CACHE": str(where)}


def timed_train(manifest: Path, out: Path, env: dict) -> tuple[float, int]:
    """(wall seconds, peak RSS in MiB) of `headstart train --manifest MANIFEST` with the defaults."""
    stats = out.with_suffix(".time")
    cmd = ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), sys.executable, "-m", "headstart", "train",
           "--manifest", str(manifest), "--out", str(out), "--no-report"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"train failed: {proc.stderr.strip().splitlines()[-1:]}")
    secs, kib = stats.read_text().split()[-2:]
    return float(secs), int(kib) // 1024


def probe(model: Path, train_csv: Path, test_csv: Path) -> dict:
    """The one-vs-rest logistic regression on the model's backbone features (the model's own engine)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from headstart import ImageClassifier
    from headstart.cache.dataset import path_features
    from headstart.data.multilabel import read_multilabel
    from headstart.evaluate.multilabel import evaluate_multilabel
    from headstart.progress import NoProgress

    clf = ImageClassifier.load(model)
    parts = []
    for manifest in (train_csv, test_csv):
        data = read_multilabel(manifest, carve=False)
        y = np.zeros((len(data.paths), len(clf.classes_)), np.uint8)
        for j, c in enumerate(data.classes):
            y[:, clf.classes_.index(c)] = data.targets[:, j]
        feats = path_features(list(data.paths), np.arange(len(data.paths)), data.splits, clf.frozen_, "cpu",
                              NoProgress(), "features")
        parts.append((np.asarray(feats.features), y[feats.labels]))
    (x_tr, y_tr), (x_te, y_te) = parts
    t0 = time.perf_counter()
    scaler = StandardScaler().fit(x_tr)
    learnt = y_tr.any(0) & ~y_tr.all(0)  # a label that never (or always) occurs in training: a constant
    lr = OneVsRestClassifier(LogisticRegression(C=0.01, max_iter=2000)).fit(scaler.transform(x_tr), y_tr[:, learnt])
    proba = np.tile(y_tr.mean(0), (len(x_te), 1)).astype(np.float32)
    proba[:, learnt] = lr.predict_proba(scaler.transform(x_te))
    ev = evaluate_multilabel(y_te, proba, (0.5,) * len(clf.classes_), clf.classes_)
    return {"ev": ev, "fit_s": time.perf_counter() - t0}


def line(name: str, ev, secs: str, rss: str) -> str:
    return (f"{name:<34} {ev.map:>6.4f} {ev.macro_f1:>8.4f} {ev.micro_f1:>8.4f} {ev.subset_accuracy:>7.4f} "
            f"{secs:>9} {rss:>9}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "headstart-bench-ml")
    args = ap.parse_args()
    train_csv, test_csv, single_csv = write_split(args.work, args.seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    model, single = args.work / "model", args.work / "single"
    timed_train(train_csv, model, env)  # fills the cache: the backbone (once per machine) and these features
    cold = timed_train(train_csv, model, cold_env(env, args.work / "cold-ml"))
    single_cold = timed_train(single_csv, single, cold_env(env, args.work / "cold-single"))
    warm = [timed_train(train_csv, model, env) for _ in range(args.repeats)]
    single_warm = [timed_train(single_csv, single, env) for _ in range(args.repeats)]
    from headstart import ImageClassifier

    ours = ImageClassifier.load(model).evaluate(test_csv).metrics
    ref = probe(model, train_csv, test_csv)
    med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
    print(f"planet_sample, seeded ({args.seed}) 80/20 split: 800 training chips, 200 held out; "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'':<34} {'mAP':>6} {'macro F1':>8} {'micro F1':>8} {'subset':>7} {'train s':>9} {'peak RSS':>9}")
    print(line("defaults (head)", ours, f"{med(warm, 0):.1f}", f"{med(warm, 1)} MiB"))
    print(line("linear probe (OvR logistic, C=0.01)", ref["ev"], f"{ref['fit_s']:.1f}", "-"))
    print(f"{'--strategy finetune':<34} not available for multi-label models yet (refused in one line)")
    print(f"single-label twin (weather tag, same 800 chips), wall s and peak RSS: cold cache {single_cold[0]:.1f} s "
          f"({single_cold[1]} MiB) against multi-label {cold[0]:.1f} s ({cold[1]} MiB): ratio "
          f"{cold[0] / single_cold[0]:.2f}; warm {med(single_warm, 0):.1f} s ({med(single_warm, 1)} MiB) against "
          f"{med(warm, 0):.1f} s: ratio {med(warm, 0) / med(single_warm, 0):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
