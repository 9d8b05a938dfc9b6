"""SIGKILL at chosen points of feature extraction, of the boundary-store fill and of stage-2 training, in real
child processes that kill themselves there (a wrapper counts calls to the function named by the kill point and
sends SIGKILL before or after the Nth). Afterwards the cache is complete or ignored, never misread: a rerun
extracts or fills only what is missing and gives what an uninterrupted run gives; `fit(..., resume=True)`
finishes and equals an uninterrupted fit. (Saving's kill points belong to tests/test_serve_artifact.py.)
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE, CountingEngine

torch = pytest.importorskip("torch")

from headstart.cache import features  # noqa: E402
from headstart.cache.boundary import BoundaryStore  # noqa: E402
from headstart.cache.features import FeatureCache  # noqa: E402
from headstart.runtime.engines import OnnxEngine  # noqa: E402
from helpers_finetune import PRE, _images, _interrupt_at_validation, finetune_classifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest: the tiny model's steps, one thread

TIMEOUT_S = 180


@dataclass(frozen=True)
class KillPoint:
    """SIGKILL the process `when` ("before"/"after") the `nth` call of `module.attr` (`attr` may be a class's
    method, "Class.method"; with `match`, only calls whose second argument, a destination path, ends so count)."""

    name: str
    module: str
    attr: str
    nth: int
    when: str = "before"
    match: str = ""


EXTRACTION = (  # 18 photos, shards of 4 rows: five shards
    KillPoint("extraction: two shards written, the third not begun", "headstart.cache.features",
              "FeatureCache.write_shard", 3),
    KillPoint("extraction: the third shard's features in a temporary file, not renamed", "os", "replace", 3,
              match=".feats.npy"),
    KillPoint("extraction: the third shard's features renamed, its keys not", "os", "replace", 3,
              match=".keys.npy"),
)
FILL = (  # 12 photos, chunks of 4: three commits
    KillPoint("boundary fill: arrays created and the first chunk written, nothing committed",
              "headstart.cache.boundary", "atomic_write_bytes", 1),
    KillPoint("boundary fill: the first chunk committed", "headstart.cache.boundary", "atomic_write_bytes", 1,
              when="after"),
    KillPoint("boundary fill: the second chunk flushed, its progress not committed", "headstart.cache.boundary",
              "atomic_write_bytes", 2),
)
TRAINING = (  # fit: the store's train split then its val split; then one checkpoint per stage-2 epoch
    KillPoint("stage 2: the boundary store's train split committed, its val split not",
              "headstart.cache.boundary", "atomic_write_bytes", 1, when="after"),
    KillPoint("stage 2: epoch 2's tensor file written, its state.json not", "headstart.train.checkpoint",
              "atomic_write_bytes", 2),
    KillPoint("stage 2: epoch 2's state.json committed, epoch 1's tensor file not yet removed",
              "headstart.train.checkpoint", "atomic_write_bytes", 2, when="after"),
)
KILL_POINTS = (*EXTRACTION, *FILL, *TRAINING)  # a bench prints these

_CHILD = textwrap.dedent("""
    import importlib, json, os, signal, sys
    from pathlib import Path

    point, job, args = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    target = importlib.import_module(point["module"])
    *owners, attr = point["attr"].split(".")
    for owner in owners:
        target = getattr(target, owner)
    real, calls = getattr(target, attr), [0]

    def killing(*a, **kw):
        counted = not point["match"] or str(a[1] if len(a) > 1 else "").endswith(point["match"])
        calls[0] += counted
        if counted and calls[0] == point["nth"] and point["when"] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*a, **kw)
        if counted and calls[0] == point["nth"] and point["when"] == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(target, attr, killing)

    if job == "extract":  # the spec comes whole from the parent: resolving a timm name would import timm
        from headstart.backbones.registry import BackboneSpec
        from headstart.cache import features
        from headstart.runtime.frozen import FrozenBackbone
        from headstart.vision.preprocess import PreprocessConfig
        features.SHARD_ROWS = 4
        spec = BackboneSpec(**{**args["spec"], "preprocess": PreprocessConfig.from_dict(args["spec"]["preprocess"])})
        frozen = FrozenBackbone.pretrained(spec, Path(args["weights"]))
        features.FeatureCache(frozen, root=Path(args["root"])).features_for(
            [Path(p) for p in args["paths"]], lambda: frozen.engine("cpu"), batch_size=4)
    elif job == "fill":
        from headstart.cache.boundary import BoundaryStore
        from headstart.runtime.engines import OnnxEngine
        from headstart.vision.preprocess import PreprocessConfig
        pre = PreprocessConfig(**args["pre"])
        BoundaryStore(args["key"], Path(args["root"])).fill(
            "train", [Path(p) for p in args["paths"]], 1, "none", 0, pre, OnnxEngine(Path(args["bottom"])),
            batch_images=4)
    elif job == "fit":
        from headstart import ImageClassifier
        ImageClassifier("{backbone}", weights=args["weights"], **args["params"]).fit(
            args["data"], checkpoint_dir=args["checkpoint"])
    print("finished: the kill point was never reached")
""").replace("{backbone}", TINY_BACKBONE)


def _killed_at(point: KillPoint, job: str, **args) -> None:
    """Run `job` in a child process that SIGKILLs itself at `point`; fail unless it died there."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(asdict(point)), job, json.dumps(args, default=str)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, f"{point.name}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}"


def _visible(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


# --- feature extraction --------------------------------------------------------------------------------------


def test_extraction_killed_anywhere_leaves_a_cache_that_is_complete_or_ignored(frozen, tiny_weights, tmp_path,
                                                                              monkeypatch):
    photos = _images(make_image_folder(tmp_path / "photos", per_class=6))
    clean = FeatureCache(frozen, root=tmp_path / "clean").features_for(photos, lambda: frozen.engine("cpu")).features
    monkeypatch.setattr(features, "SHARD_ROWS", 4)
    for n, point in enumerate(EXTRACTION):
        root = tmp_path / f"killed{n}"
        _killed_at(point, "extract", spec=asdict(frozen.spec), weights=tiny_weights, root=root, paths=photos)
        rows_on_disk = 4 * (point.nth - 1)  # the shards before the one being written when killed
        rows = [0]

        def counting():
            engine = frozen.engine("cpu")

            def run(batch):
                rows[0] += len(batch)
                return engine(batch)

            return run

        got = FeatureCache(frozen, root=root).features_for(photos, counting, batch_size=4)
        assert got.hits == rows_on_disk and rows[0] == len(photos) - rows_on_disk, point.name
        np.testing.assert_allclose(got.features, clean, atol=1e-5, rtol=0, err_msg=point.name)
        assert FeatureCache(frozen, root=root).features_for(photos, counting).hits == len(photos), point.name


# --- the boundary store's fill -------------------------------------------------------------------------------


def test_a_boundary_fill_killed_anywhere_resumes_to_what_an_uninterrupted_fill_stores(ft_cache, tmp_path):
    (bottom,) = (ft_cache / "onnx").glob("bottom-*.onnx")
    engine = OnnxEngine(bottom)
    paths = _images(make_image_folder(tmp_path / "photos", per_class=4, size=(72, 56)))
    # Unaugmented: augmenting imports torchvision, seconds in each child; the fill's commits are the same.
    fill = functools.partial(BoundaryStore.fill, name="train", paths=paths, views=1, augment="none", seed=0,
                             cfg=PRE, batch_images=4)
    reference = BoundaryStore(dict(test="kill"), tmp_path / "ref")
    fill(reference, engine=engine)
    ref_acts, ref_taps, _ = (np.array(a) for a in reference.arrays("train"))
    for n, point in enumerate(FILL):
        root = tmp_path / f"killed{n}"
        _killed_at(point, "fill", key=dict(test="kill"), root=root, paths=paths, pre=PRE.to_dict(), bottom=bottom)
        committed = 4 * (point.nth - (point.when == "before"))  # images progress.json vouches for
        counting = CountingEngine(engine)
        assert fill(BoundaryStore(dict(test="kill"), root), engine=counting) == [], point.name
        assert counting.calls == -(-(len(paths) - committed) // 4), point.name  # only what was not committed
        acts, taps, ok = BoundaryStore(dict(test="kill"), root).arrays("train")
        assert ok.all() and np.array_equal(acts, ref_acts) and np.array_equal(taps, ref_taps), point.name


# --- stage-2 training, through fit --------------------------------------------------------------------------


def test_a_fit_killed_in_stage_2_resumes_to_what_an_uninterrupted_fit_gives(tiny_weights, ft_cache, image_folder,
                                                                           tmp_path, monkeypatch):
    settings = dict(finetune_epochs=3, views=2, batch_size=8)  # several batches per epoch: the RNG state matters
    settings["engine"] = "fp32"  # by name: the child resolves "auto" by its CPU, outside conftest's pin
    params = finetune_classifier(tiny_weights, **settings).get_params()
    params.pop("backbone"), params.pop("weights")
    files = _images(image_folder)

    whole_cache = tmp_path / "whole-cache"  # its own boundary store: a wrongly resumed one must not be shared
    shutil.copytree(ft_cache / "onnx", whole_cache / "onnx")
    with monkeypatch.context() as mp:
        mp.setenv("HEADSTART_CACHE", str(whole_cache))
        whole = finetune_classifier(tiny_weights, **settings).fit(image_folder, checkpoint_dir=tmp_path / "whole")
        expected = whole.predict_proba(files)

    for n, point in enumerate(TRAINING):
        ckpt = tmp_path / f"killed{n}" / "checkpoint"
        _killed_at(point, "fit", weights=tiny_weights, data=image_folder, checkpoint=ckpt, params=params)
        with monkeypatch.context() as mp:
            calls = _interrupt_at_validation(mp, call=-1)  # counts only
            resumed = finetune_classifier(tiny_weights, **settings).fit(image_folder, checkpoint_dir=ckpt,
                                                                         resume=True)
        if point.module == "headstart.train.checkpoint":  # epoch 1's checkpoint, or epoch 2's when committed
            done = 2 if point.when == "after" else 1
            assert calls[0] == settings["finetune_epochs"] - done, point.name
        assert not ckpt.exists(), point.name
        assert resumed.decision_.stage2.history == whole.decision_.stage2.history, point.name
        assert resumed.frozen_.weights_id == whole.frozen_.weights_id, point.name
        np.testing.assert_allclose(resumed.predict_proba(files), expected, atol=1e-6, rtol=0, err_msg=point.name)
