"""Core numbers of issue 2, measured as a user meets them: the CLI in fresh processes, defaults only.

    .venv/bin/python bench/core.py [--repeats 3] [--data ../shared/data]

Prints a table: accuracy on hymenoptera (train -> val) and flowers (80/20), extraction images/s (decode
included), cold and warm `headstart train` wall time against one `headstart predict` pass over the same images,
and each run's peak RSS. Timings are medians over --repeats runs; the machine is noisy. Every figure is measured in
this run; peers (fastai's recipe on the same weights and splits) are measured side by side by bench/peers.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HS = [str(ROOT / ".venv" / "bin" / "headstart")]


def measured(args: list[str], env: dict) -> tuple[float, float, float]:
    """Wall seconds, user+sys CPU seconds and peak RSS (MiB) of one child process (every bench times its children
    with this one function)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def run(args: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    wall, _, peak = measured(args, env)
    return wall, peak


def split80(src: Path, dst: Path) -> None:
    """Every 5th file of each class to val, the rest to train: the acceptance check's split80 exactly (visible
    entries in byte order, as `ls | sort` lists them in the C locale; both folders made for every class)."""
    for cls in sorted((p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name):
        for part in ("train", "val"):
            (dst / part / cls.name).mkdir(parents=True, exist_ok=True)
        files = sorted((f for f in cls.iterdir() if not f.name.startswith(".")), key=lambda f: f.name)
        for i, f in enumerate(files):
            (dst / ("val" if i % 5 == 4 else "train") / cls.name / f.name).symlink_to(f)


def score(model: Path, folder: Path, env: dict) -> float:
    code = "import sys; from headstart import ImageClassifier as C; print(C.load(sys.argv[1]).score(sys.argv[2]))"
    out = subprocess.run([sys.executable, "-c", code, str(model), str(folder)], env=env, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="headstart-bench-"))
    env = {**os.environ, "HEADSTART_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    rows: list[tuple[str, str]] = []
    try:
        hym = args.data / "hymenoptera"
        run(HS + ["train", str(hym / "train"), "--out", str(work / "hym")], env)  # also converts + exports once
        rows.append(("hymenoptera val accuracy (train -> val)", f"{score(work / 'hym', hym / 'val', env):.4f}"))

        flowers = work / "flowers"
        split80(args.data / "flowers", flowers)
        n = sum(1 for _ in (flowers / "train").rglob("*.jpg"))
        cold, warm, predict, rss = [], [], [], []
        for r in range(args.repeats):
            shutil.rmtree(work / "cache" / "features", ignore_errors=True)
            wall, peak = run(HS + ["train", str(flowers / "train"), "--out", str(work / f"fl{r}")], env)
            cold.append(wall)
            rss.append(peak)
            predict.append(run(HS + ["predict", str(work / f"fl{r}"), str(flowers / "train"), "--format", "csv"], env)[0])
            warm.append(run(HS + ["train", str(flowers / "train"), "--out", str(work / f"fw{r}")], env)[0])
        acc = score(work / "fl0", flowers / "val", env)
        # The same pass through the standard 224 px view alone: the flowers photos are 128 px, so the defaults
        # add a native view (30% more inference); this is the extractor's rate without it.
        run(HS + ["train", str(flowers / "train"), "--out", str(work / "single"), "--no-native-view"], env)
        single = [run(HS + ["predict", str(work / "single"), str(flowers / "train"), "--format", "csv"], env)[0]
                  for _ in range(args.repeats)]
        single_acc = score(work / "single", flowers / "val", env)
        med = statistics.median
        rows += [
            ("flowers val accuracy (head alone, 80/20)", f"{acc:.4f}"),
            ("flowers val accuracy, 224 px view alone (--no-native-view)", f"{single_acc:.4f}"),
            (f"predict pass over {n} images: s (images/s, decode included)", f"{med(predict):.1f} ({n / med(predict):.0f}/s)"),
            ("the same, 224 px view alone: s (images/s)", f"{med(single):.1f} ({n / med(single):.0f}/s)"),
            ("train, cold feature cache: s", f"{med(cold):.1f}"),
            ("train cold / predict pass (target <= 1.3)", f"{med(cold) / med(predict):.2f}"),
            ("train, warm cache: s (target <= 10)", f"{med(warm):.1f}"),
            ("peak RSS of cold train: MiB", f"{max(rss):.0f}"),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, f"medians of {args.repeats} runs, {os.cpu_count()} CPUs")


def print_table(rows: list[tuple[str, str]], note: str) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"{'measure'.ljust(width)}  value   ({note})")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    main()
