"""Does refitting the chosen head on train + validation help? Held-out accuracy with and without the refit.

    .venv/bin/python bench/refit.py [--seeds 0,1,2] [--sets hymenoptera,flowers]

For each set and seed, `ImageClassifier(refit=False)` and `ImageClassifier(refit=True)` are fitted with the same
settings (so validation chooses the same head and epoch count in both) and scored on photos neither the choice nor
the refit saw: hymenoptera's own `val/` folder (trained on `train/`), and flowers' `--test-split 0.2` (drawn per
seed, so each seed is another split too). Every figure is measured in this run; times are medians over the seeds
of the head training (`train_s`, stage 1 with its refit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ENGINE = "fp32"  # the float ONNX Runtime features: the question is the refit's, not the engine's


def run(name: str, seed: int, refit: bool) -> dict:
    from headstart import ImageClassifier

    if name == "hymenoptera":
        clf = ImageClassifier(seed=seed, refit=refit, cv=0, engine=ENGINE).fit(DATA / "hymenoptera" / "train")
        held = clf.evaluate(DATA / "hymenoptera" / "val").metrics
    else:
        clf = ImageClassifier(seed=seed, refit=refit, cv=0, test_split=0.2, engine=ENGINE).fit(DATA / name)
        held = clf.test_metrics_
    return {"set": name, "seed": seed, "refit": refit, "head": "-".join(map(str, clf.head_config_.hidden)) or "linear",
            "epochs": clf.history_.best_epoch + 1, "val": clf.val_metrics_.accuracy, "held": held.accuracy,
            "n_held": held.n, "train_s": clf.timings_.get("train_s", 0.0),
            "refitted_on": clf.decision_.refitted}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sets", default="hymenoptera,flowers")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    print(f"{'set':<12} {'seed':>4} {'refit':>5} {'head':>6} {'epochs':>6} {'val (chose)':>11} "
          f"{'held-out':>8} {'n':>5} {'train s':>7} {'refit on':>8}")
    for name in args.sets.split(","):
        for seed in seeds:
            for refit in (False, True):
                r = run(name, seed, refit)
                rows.append(r)
                print(f"{r['set']:<12} {seed:>4} {'yes' if refit else 'no':>5} {r['head']:>6} {r['epochs']:>6} "
                      f"{r['val']:>11.4f} {r['held']:>8.4f} {r['n_held']:>5} {r['train_s']:>7.1f} "
                      f"{r['refitted_on']:>8}", flush=True)
    print()
    print(f"{'set':<12} {'held-out, no refit':>18} {'with refit':>10} {'gain (points)':>20} "
          f"{'median train s no/yes':>22}")
    for name in args.sets.split(","):
        pair = {(r["seed"], r["refit"]): r for r in rows if r["set"] == name}
        base = [pair[(s, False)]["held"] for s in seeds]
        refit = [pair[(s, True)]["held"] for s in seeds]
        gains = [100 * (b - a) for a, b in zip(base, refit)]
        times = [statistics.median(pair[(s, f)]["train_s"] for s in seeds) for f in (False, True)]
        print(f"{name:<12} {statistics.mean(base):>18.4f} {statistics.mean(refit):>10.4f} "
              f"{statistics.mean(gains):>+7.2f} ({', '.join(f'{g:+.1f}' for g in gains)}) "
              f"{times[0]:>11.1f} / {times[1]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
