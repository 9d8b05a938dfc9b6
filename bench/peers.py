"""Peers measured side by side: fastai's documented transfer-learning recipe against headstart, on the same Lite0
weights and the same splits, each a fresh process timed and measured as a user meets it.

    .venv/bin/python bench/peers.py [--sets hymenoptera,flowers] [--recipes fastai,head,finetune] [--limit N]

Prints one row per (tool, recipe, data set): validation accuracy, wall seconds, user+sys CPU seconds, peak RSS of
the largest process (what `/usr/bin/time -f %M` reports) and the peak proportional set size of the whole process
tree (fastai's data-loader workers included), sampled from /proc every half second.

- fastai runs in its own virtual environment, bench/.venv-peers (git-ignored), created on first use and reused
  while its pins match (`PINS`: the torch build already on this machine's disk, headstart's timm version, fastai).
  The recipe is the one fastai documents: `ImageDataLoaders.from_folder(item_tfms=Resize(224),
  batch_tfms=aug_transforms())`, `vision_learner(dls, "tf_efficientnet_lite0", metrics=accuracy)` and
  `fine_tune(4, 2e-3)` (one frozen epoch, four unfrozen), seeded. Its backbone is timm's tf_efficientnet_lite0
  loaded through `pretrained_cfg_overlay=dict(file=...)` from the very safetensors file headstart converts its
  bundled weights into (headstart is asked for the path; nothing is downloaded and nothing is unpickled).
- headstart runs its CLI with defaults (`headstart train TRAIN --out M`, `--strategy finetune` for the finetune
  recipe) and is scored on the same validation folder. Its feature and boundary caches are emptied before each
  run; the backbone conversion and ONNX export happen once beforehand and are not counted (as in bench/core.py
  and the acceptance checks). headstart holds a fifth of TRAIN out for its own early stopping; fastai trains on
  all of TRAIN, as its recipe does. Neither sees the validation folder while training.
- Splits: hymenoptera train/ -> val/; flowers 80/20 by `core.split80`, the acceptance check's split (every 5th
  file of each class in byte order to val/). `--limit N` keeps the first N files of each class in each split: a
  dry run of the whole path in minutes (the full flowers fastai run takes about half an hour on 2 cores).

The machine is shared and noisy: read wall seconds beside CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from core import split80  # noqa: E402

HS_PY = ROOT / ".venv" / "bin" / "python"
HS = ROOT / ".venv" / "bin" / "headstart"
VENV = ROOT / "bench" / ".venv-peers"
# torch and torchvision at the release on this machine's disk (the cap in /etc/xdg/pip/constraints.txt), so the
# install reads no network for them; timm is pinned to headstart's own version at run time (`pins`).
PINS = ("torch==2.14.1", "torchvision==0.29.1", "fastai==2.8.12")
SETS = ("hymenoptera", "flowers")
RECIPES = ("fastai", "head", "finetune")
RECIPE_TEXT = {
    "fastai": "vision_learner + aug_transforms, fine_tune({epochs}, {lr:g})",
    "head": "headstart train (defaults)",
    "finetune": "headstart train --strategy finetune",
}
SAMPLE_S = 0.5


@dataclass(frozen=True)
class Split:
    """A data set as a folder holding train/ and val/, each of class sub-folders."""

    name: str
    root: Path

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def val(self) -> Path:
        return self.root / "val"


@dataclass(frozen=True)
class Usage:
    """What one child process tree cost: wall and CPU seconds, largest single RSS, peak tree PSS."""

    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    tree_pss_mib: float


@dataclass(frozen=True)
class Row:
    tool: str
    recipe: str
    data: str
    n_train: int
    n_val: int
    accuracy: float
    usage: Usage


# --- data -------------------------------------------------------------------------------------------------------


def class_files(folder: Path) -> dict[str, list[Path]]:
    """Each class folder's visible files in byte order, as `ls | sort` lists them under LC_ALL=C."""
    classes = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    return {c.name: sorted((f for f in c.iterdir() if not f.name.startswith(".")), key=lambda f: f.name)
            for c in classes}


def limited(split: Split, dst: Path, limit: int) -> Split:
    """The first `limit` files of each class in each of train/ and val/, as symlinks under `dst`."""
    for part in ("train", "val"):
        for cls, files in class_files(split.root / part).items():
            (dst / part / cls).mkdir(parents=True, exist_ok=True)
            for f in files[:limit]:
                (dst / part / cls / f.name).symlink_to(f.resolve())
    return Split(split.name, dst)


def prepare(name: str, data: Path, work: Path, limit: int | None) -> Split:
    if name == "hymenoptera":
        split = Split(name, data / "hymenoptera")
    elif name == "flowers":
        split = Split(name, work / "flowers")
        split80(data / "flowers", split.root)
    else:
        raise SystemExit(f"unknown data set {name!r}: choose from {', '.join(SETS)}")
    for part in (split.train, split.val):
        if not part.is_dir():
            raise SystemExit(f"{part}: not found (pass --data, the folder holding hymenoptera/ and flowers/)")
    return limited(split, work / f"{name}-limit{limit}", limit) if limit else split


def count_images(folder: Path) -> int:
    return sum(len(files) for files in class_files(folder).values())


# --- measuring a process tree -----------------------------------------------------------------------------------


def _all_children(root: int) -> list[int]:
    """Every live descendant of `root`, from every process's parent in /proc/PID/stat (this kernel has no
    /proc/PID/task/TID/children)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended while we looked
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _pss_kib(pid: int) -> int:
    """Proportional set size: pages shared by forked workers count once across the tree, not once per process."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_mib(pid: int) -> float:
    return sum(_pss_kib(p) for p in [pid, *_all_children(pid)]) / 1024


def measure(cmd: list[str], env: dict[str, str], log: Path) -> Usage:
    """Run `cmd` to the end, its output to `log`; exits with the log's tail if it fails."""
    peak = [0.0]
    done = threading.Event()
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.wait(SAMPLE_S):
                peak[0] = max(peak[0], tree_pss_mib(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4's usage covers the child and every descendant it waited for: CPU summed, maxrss the largest.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return Usage(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, peak[0])


# --- the peers' environment -------------------------------------------------------------------------------------


def pins() -> list[str]:
    """PINS and headstart's own timm version, so that both build the same tf_efficientnet_lite0."""
    code = "import importlib.metadata as m; print(m.version('timm'))"
    timm = subprocess.run([str(HS_PY), "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [*PINS, f"timm=={timm}"]


def venv_matches(python: Path, wanted: list[str]) -> bool:
    """Whether `python` exists and has exactly the pinned versions installed."""
    if not python.exists():
        return False
    code = ("import importlib.metadata as m, sys\n"
            "for pin in sys.argv[1:]:\n"
            "    name, version = pin.split('==')\n"
            "    try:\n        assert m.version(name) == version\n"
            "    except Exception:\n        sys.exit(1)\n")
    return subprocess.run([str(python), "-c", code, *wanted], capture_output=True, check=False).returncode == 0


def ensure_venv(venv: Path) -> Path:
    """The peers' python: `venv` reused while its pins match, else created or updated (about 2 minutes)."""
    python, wanted = venv / "bin" / "python", pins()
    if venv_matches(python, wanted):
        return python
    print(f"installing {' '.join(wanted)} into {venv} ...", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted],
                   check=True)
    if not venv_matches(python, wanted):
        raise SystemExit(f"{venv}: the install did not leave {' '.join(wanted)}")
    return python


def headstart_weights(env: dict[str, str]) -> Path:
    """The safetensors file headstart builds its Lite0 from (converted from the bundled package on first use)."""
    code = ("from headstart.backbones.registry import resolve\n"
            "from headstart.backbones.weights import pretrained_weights_path\n"
            "print(pretrained_weights_path(resolve('efficientnet_lite0')))")
    out = subprocess.run([str(HS_PY), "-c", code], env=env, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


# --- the runs ---------------------------------------------------------------------------------------------------


def score(model: Path, folder: Path, env: dict[str, str]) -> float:
    code = "import sys; from headstart import ImageClassifier as C; print(C.load(sys.argv[1]).score(sys.argv[2]))"
    out = subprocess.run([str(HS_PY), "-c", code, str(model), str(folder)], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_headstart(recipe: str, split: Split, work: Path, env: dict[str, str], seed: int) -> tuple[float, Usage]:
    for kind in ("features", "boundary"):  # cold caches: what a user's first run on these photos pays
        shutil.rmtree(Path(env["HEADSTART_CACHE"]) / kind, ignore_errors=True)
    model = work / f"hs-{recipe}-{split.name}"
    cmd = [str(HS), "train", str(split.train), "--out", str(model), "--seed", str(seed)]
    if recipe == "finetune":
        cmd += ["--strategy", "finetune"]
    usage = measure(cmd, env, work / f"{model.name}.log")
    return score(model, split.val, env), usage


def run_fastai(python: Path, split: Split, weights: Path, work: Path, args: argparse.Namespace) -> tuple[float, Usage]:
    result = work / f"fastai-{split.name}.json"
    cmd = [str(python), str(Path(__file__).resolve()), "_fastai", str(split.root), str(weights), str(result),
           str(args.epochs), str(args.lr), str(args.seed)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADSTART")}
    env |= {"HF_HUB_OFFLINE": "1", "FASTAI_HOME": str(work / "fastai-home")}
    usage = measure(cmd, env, work / f"fastai-{split.name}.log")
    return json.loads(result.read_text())["accuracy"], usage


def fastai_child(root: str, weights: str, result: str, epochs: str, lr: str, seed: str) -> None:
    """Runs in the peers' venv: fastai's recipe, as its docs write it, on root/train -> root/val."""
    from fastai.vision.all import (
        ImageDataLoaders,
        Resize,
        accuracy,
        aug_transforms,
        get_image_files,
        set_seed,
        vision_learner,
    )

    set_seed(int(seed), reproducible=True)
    # fastai's default batch of 64; fewer only for a training set smaller than that (a --limit dry run), whose
    # every epoch would otherwise be empty (the training loader drops its last, incomplete batch).
    bs = min(64, max(2, len(get_image_files(Path(root) / "train")) // 2))
    dls = ImageDataLoaders.from_folder(root, train="train", valid="val", item_tfms=Resize(224),
                                       batch_tfms=aug_transforms(), bs=bs)
    learn = vision_learner(dls, "tf_efficientnet_lite0", metrics=accuracy,
                           pretrained_cfg_overlay=dict(file=weights))
    checked = same_weights(learn.model[0].model.state_dict(), weights)
    learn.fine_tune(int(epochs), float(lr))
    acc = float(learn.validate()[1])
    Path(result).write_text(json.dumps({"accuracy": acc, "n_train": len(dls.train_ds), "n_val": len(dls.valid_ds),
                                        "bs": bs, "tensors_checked": checked}))


def same_weights(own: dict, weights: str) -> int:
    """How many of the backbone's tensors equal headstart's file, before training; exits unless all of them do
    (timm drops only the ImageNet classifier)."""
    import torch
    from safetensors.torch import load_file

    ref = load_file(weights)
    differ = [k for k, v in own.items() if k not in ref or not torch.equal(v, ref[k])]
    if differ or not own:
        raise SystemExit(f"fastai's backbone is not headstart's weights: {len(differ)} of {len(own)} tensors differ")
    return len(own)


# --- the table --------------------------------------------------------------------------------------------------

HEADER = ("tool", "recipe", "data set", "train/val", "val acc", "wall s", "cpu s", "peak RSS MiB", "tree PSS MiB")


def table(rows: list[Row]) -> str:
    cells = [HEADER] + [(r.tool, r.recipe, r.data, f"{r.n_train}/{r.n_val}", f"{r.accuracy:.4f}",
                         f"{r.usage.wall_s:.0f}", f"{r.usage.cpu_s:.0f}", f"{r.usage.peak_rss_mib:.0f}",
                         f"{r.usage.tree_pss_mib:.0f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--sets", default="hymenoptera", help=f"comma-separated, of {','.join(SETS)}")
    ap.add_argument("--recipes", default="fastai,head", help=f"comma-separated, of {','.join(RECIPES)}")
    ap.add_argument("--limit", type=int, default=None, help="first N files per class and split: a dry run")
    ap.add_argument("--epochs", type=int, default=4, help="fastai fine_tune epochs (its recipe: 4)")
    ap.add_argument("--lr", type=float, default=2e-3, help="fastai fine_tune base rate (its recipe: 2e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--venv", type=Path, default=VENV, help="the peers' virtual environment (made if missing)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    args.recipes = [r for r in args.recipes.split(",") if r]
    for value, allowed in ((args.sets, SETS), (args.recipes, RECIPES)):
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            ap.error(f"choose from {','.join(allowed)} (got {','.join(bad) or 'nothing'})")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="headstart-peers-"))
    env = {**os.environ, "HEADSTART_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    rows: list[Row] = []
    try:
        python = ensure_venv(args.venv) if "fastai" in args.recipes else None
        splits = [prepare(name, args.data, work, args.limit) for name in args.sets]
        # Converts the bundled weights and exports the backbone once, not counted (as bench/core.py does); a few
        # photos do it (their features are dropped before every counted run).
        warm = limited(splits[0], work / "warm-data", 3)
        measure([str(HS), "train", str(warm.train), "--out", str(work / "warm")], env, work / "warm.log")
        weights = headstart_weights(env)
        for split in splits:
            n_train, n_val = count_images(split.train), count_images(split.val)
            for recipe in args.recipes:
                if recipe == "fastai":
                    assert python is not None  # made above whenever fastai is among the recipes
                    acc, usage = run_fastai(python, split, weights, work, args)
                    tool = "fastai"
                else:
                    acc, usage = run_headstart(recipe, split, work, env, args.seed)
                    tool = "headstart"
                text = RECIPE_TEXT[recipe].format(epochs=args.epochs, lr=args.lr)
                rows.append(Row(tool, text, split.name, n_train, n_val, acc, usage))
                print(f"{tool} {recipe} {split.name}: {acc:.4f} in {usage.wall_s:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    limit = f", first {args.limit} per class and split" if args.limit else ""
    print(f"peers on {os.cpu_count()} CPUs (shared machine: read CPU s beside wall s), seed {args.seed}{limit}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_fastai"]:
        fastai_child(*sys.argv[2:])
    else:
        main()
