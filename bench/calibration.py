"""ECE before and after temperature scaling (issue 14, part 5), measured in this run.

    .venv/bin/python bench/calibration.py [--data ../shared/data] [--sets hymenoptera,flowers]

For hymenoptera (train -> val) and flowers (the acceptance check's 80/20 split): train with the defaults (which
store the temperature in the model), re-fit the temperature on the training run's own validation split (checked
equal to the stored one) (carved from the training folder exactly as `train`
carved it: same fractions and seed), then measure ECE (15 bins) and log loss on the held-out folder before and
after. The cross-fitted figure (T fitted on half the held-out folder, scored on the other half, both ways) is
what `headstart report` shows; it is printed beside for comparison. Features come from the usual cache.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from core import split80

from headstart import ImageClassifier
from headstart.cache.dataset import dataset_features
from headstart.data.scan import scan_folder
from headstart.evaluate.calibration import calibrate, measured
from headstart.heads.config import head_logits_numpy
from headstart.progress import NoProgress
from headstart.tasks.report import score_folder


def validation_logits(clf: ImageClassifier, train_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The logits and labels of the validation split the training run used (it chose the head and its epoch)."""
    dataset = scan_folder(train_dir, val_split=clf.val_split, test_split=clf.test_split, seed=clf.seed)
    feats = dataset_features(dataset, clf.frozen_, clf.device, NoProgress())
    x, y = feats.part("val")
    assert len(y) == clf.val_metrics_.n, "the re-carved validation split differs from the training run's"
    to_model = np.array([clf.classes_.index(c) for c in dataset.classes])
    return head_logits_numpy(clf.head_state_, clf.head_config_, np.asarray(x)), to_model[y]


def measure(name: str, train_dir: Path, held_out: Path) -> None:
    t0 = time.perf_counter()
    clf = ImageClassifier().fit(train_dir)
    val_z, val_y = validation_logits(clf, train_dir)
    test = score_folder(clf, held_out)
    on_val = calibrate(test.logits, test.labels, fit_logits=val_z, fit_labels=val_y)
    # train fits this very temperature on the same validation logits; it stores it unless it raised their ECE.
    cal = clf.report_.calibration
    fitted = (cal.refused or cal.temperature) if cal else 1.0
    assert abs(on_val.temperature - fitted) < 1e-6 * on_val.temperature, (on_val.temperature, fitted)
    held = measured(test.logits, test.labels, clf.head_config_.temperature, "stored")
    refused = " (the fitted T raised validation ECE: refused)" if cal and cal.refused else ""
    print(f"{name:12s} stored T={held.temperature:.3f}{refused}: held-out ECE {held.ece_before:.4f} -> "
          f"{held.ece_after:.4f}, log loss {held.nll_before:.4f} -> {held.nll_after:.4f}", flush=True)
    crossed = calibrate(test.logits, test.labels, folds=2, seed=0)
    acc = float((test.logits.argmax(1) == test.labels).mean())
    print(f"{name:12s} held-out n={on_val.n:4d} acc {acc:.4f} | T fitted on validation (n={len(val_y)}): "
          f"T={on_val.temperature:.3f} ECE {on_val.ece_before:.4f} -> {on_val.ece_after:.4f}, "
          f"log loss {on_val.nll_before:.4f} -> {on_val.nll_after:.4f} | cross-fitted: T={crossed.temperature:.3f} "
          f"ECE {crossed.ece_before:.4f} -> {crossed.ece_after:.4f} | {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--sets", default="hymenoptera,flowers", help="comma-separated: hymenoptera, flowers")
    args = ap.parse_args()
    sets = args.sets.split(",")
    if "hymenoptera" in sets:
        measure("hymenoptera", args.data / "hymenoptera" / "train", args.data / "hymenoptera" / "val")
    if "flowers" not in sets:
        return
    with tempfile.TemporaryDirectory(prefix="headstart-calib-") as work:
        split = Path(work) / "flowers"
        split80(args.data / "flowers", split)
        measure("flowers", split / "train", split / "val")


if __name__ == "__main__":
    main()
