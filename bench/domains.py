"""Accuracy on the user's own domain (issue 26): for each set, held-out accuracy, balanced accuracy, per-class
recall, train seconds and peak RSS of

- `defaults`: `headstart train DIR` as a user runs it;
- `head-only`: the defaults before issue 26 (`--strategy head --no-balance`: the head alone, unweighted);
- `recipe`: the issue's reference fine-tuning recipe as a plain script (bench/domains_recipe.py), which skips
  headstart's pipeline (no cache; its seconds are the script's own).

Sets: elpv, hymenoptera, flowers, and `grouped`: hymenoptera/train with each photo also stored at two other
brightness levels and two JPEG qualities (`VARIANTS`, a part shot under several lights), held out on
hymenoptera/val made the same way, whose groups are never seen in training; its "own validation" column must stay within
5 points of the held-out figures (issue 26's honest validation).

    .venv/bin/python bench/domains.py [--sets elpv,hymenoptera,flowers,grouped] [--runs defaults,head-only,recipe]
                                      [--recipe-epochs 12]

elpv and flowers are split as ../shared/tools/acceptance.sh does (every 5th photo of each class held out, by
symlinks); hymenoptera uses its own train/ and val/. Each `headstart train` starts from a fresh feature cache in
which the backbone was converted and exported once beforehand (not counted), as the acceptance checks do. Nothing
is chosen on the held-out photos: each run chooses on its own validation split of the training part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "bench"))
from core import HS, measured, split80  # noqa: E402

RUNS = {"defaults": [], "head-only": ["--strategy", "head", "--no-balance"]}
SCORE = """
import json, sys
import numpy as np
from headstart import ImageClassifier
from headstart.data.scan import scan_folder
clf, ds = ImageClassifier.load(sys.argv[1]), scan_folder(sys.argv[2], val_split=0.0)
pred = clf.predict([s.path for s in ds.samples])
truth = [ds.classes[s.label] for s in ds.samples]
recall = {c: float(np.mean([p == c for p, t in zip(pred, truth) if t == c])) for c in ds.classes}
val = clf.val_metrics_
print(json.dumps(dict(accuracy=float(np.mean([p == t for p, t in zip(pred, truth)])),
                      balanced=float(np.mean(list(recall.values()))), recall=recall,
                      val=None if val is None else [float(val.accuracy), float(val.balanced_accuracy)],
                      decision={**clf.decision_.to_dict(),
                                "companion": clf.frozen_.companion.spec.name if clf.frozen_.companion else None})))
"""


def held_out(name: str, work: Path) -> tuple[Path, Path]:
    if name == "hymenoptera":
        return DATA / "hymenoptera" / "train", DATA / "hymenoptera" / "val"
    if name == "grouped":
        return grouped(DATA / "hymenoptera" / "train", work / "grouped"), \
            grouped(DATA / "hymenoptera" / "val", work / "grouped-val")
    target = work / name
    if not (target / "train").exists():
        split80(DATA / name, target)
    return target / "train", target / "val"


# Each photo and four copies, as a part shot under several lights: darker, brighter, and re-encoded at two JPEG
# qualities. The held-out photos (hymenoptera/val and their copies) belong to no group seen in training.
VARIANTS = (("dark", 0.75, 90), ("bright", 1.3, 90), ("q40", 1.0, 40), ("q70", 1.0, 70))


def grouped(src: Path, target: Path) -> Path:
    """hymenoptera/train with every photo also stored as `VARIANTS` (issue 26's grouped set), made once."""
    from PIL import Image, ImageEnhance

    if (target / ".done").exists():
        return target
    for photo in sorted(src.glob("*/*")):
        out = target / photo.parent.name
        out.mkdir(parents=True, exist_ok=True)
        img = Image.open(photo).convert("RGB")
        img.save(out / f"{photo.stem}.jpg", quality=95)
        for name, light, quality in VARIANTS:
            ImageEnhance.Brightness(img).enhance(light).save(out / f"{photo.stem}-{name}.jpg", quality=quality)
    (target / ".done").touch()
    return target


def run_headstart(train: Path, val: Path, flags: list[str], work: Path, env: dict) -> dict:
    cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    env = {**env, "HEADSTART_CACHE": str(cache)}
    subprocess.run(HS + ["train", str(DATA / "hymenoptera" / "val"), "--out", str(cache / "warm"), "--no-report"],
                   env=env, capture_output=True, check=True)  # converts and exports the backbone: not counted
    model = cache / "model"
    wall, cpu, rss = measured(HS + ["train", str(train), "--out", str(model), "--no-report", *flags], env)
    out = subprocess.run([sys.executable, "-c", SCORE, str(model), str(val)], env=env, capture_output=True, text=True)
    if out.returncode or not out.stdout.strip():
        sys.exit(f"scoring {model} on {val} failed: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "seconds": wall, "cpu_s": cpu, "rss_mib": rss}


def run_recipe(train: Path, val: Path, epochs: int, env: dict) -> dict:
    args = [sys.executable, str(ROOT / "bench" / "domains_recipe.py"), str(train), str(val), "--epochs", str(epochs)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(args)}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024}


def describe(decision: dict | None) -> str:
    if not decision:
        return ""
    stage2 = decision.get("stage2") or {}
    epochs = len((stage2.get("history") or {}).get("val_loss", []))
    parts = [f"kept {decision['kept']}", "balanced" if decision.get("balanced") else "unweighted"]
    if decision.get("companion"):
        parts.append(f"{decision['companion']}'s features beside")
    if stage2:
        parts.append(f"{epochs} fine-tuning epochs")
    if decision.get("refitted"):
        parts.append(f"head refitted on {decision['refitted']} photos")
    if decision.get("groups"):
        parts.append(decision["groups"].split(" (")[0] + " kept together")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="elpv,hymenoptera,flowers,grouped")
    ap.add_argument("--runs", default="defaults,head-only,recipe")
    ap.add_argument("--recipe-epochs", type=int, default=12)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "headstart-domains")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    print("| set | run | accuracy | balanced | own validation (acc / balanced) | recall per class | train s | CPU s | "
          "peak RSS MiB | what auto did |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.sets.split(","):
        train, val = held_out(name, a.work)
        for run in a.runs.split(","):
            r = run_recipe(train, val, a.recipe_epochs, env) if run == "recipe" else \
                run_headstart(train, val, RUNS[run], a.work, env)
            recall = ", ".join(f"{c} {v:.2f}" for c, v in r["recall"].items())
            own = " / ".join(f"{v:.3f}" for v in r["val"]) if r.get("val") else ""  # not `val`: the held-out photos
            print(f"| {name} | {run} | {r['accuracy']:.3f} | {r['balanced']:.3f} | {own} | {recall} | "
                  f"{r['seconds']:.0f} | {r['cpu_s']:.0f} | {r['rss_mib']:.0f} | {describe(r.get('decision'))} |",
                  flush=True)


if __name__ == "__main__":
    main()
