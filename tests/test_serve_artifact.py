"""The saved model: a round trip predicts identically, the metadata says everything needed to rebuild and audit
it, and loading refuses anything damaged or unsafe with a one-line ArtifactError (never unpickling)."""

from __future__ import annotations

import json
from dataclasses import replace
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from helpers_cli import assert_one_line
from helpers_models import TINY_BACKBONE
from headstart import ImageClassifier
from headstart.serve import artifact
from headstart.serve.artifact import META_FILE, WEIGHTS_FILE
from headstart.errors import ArtifactError
from headstart.backbones.registry import resolve
from headstart.heads.config import HeadConfig
from headstart.vision.preprocess import PreprocessConfig


@pytest.fixture
def fitted(image_folder, tiny_weights, tiny_cache) -> ImageClassifier:
    return ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=10, hidden=(16,), device="cpu").fit(image_folder)


@pytest.fixture
def model_dir(fitted, tmp_path) -> Path:
    return fitted.save(tmp_path / "model")


def _images(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


def test_save_load_round_trip_predicts_identically(fitted, image_folder, tmp_path, monkeypatch):
    images = _images(image_folder)
    before = fitted.predict_proba(images)
    assert before.shape == (len(images), 3)
    np.testing.assert_allclose(before.sum(1), 1.0, atol=1e-5)
    out = fitted.save(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == [META_FILE, WEIGHTS_FILE]

    # A fresh cache: the loaded model rebuilds its backbone from model.safetensors alone.
    fresh_cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("HEADSTART_CACHE", str(fresh_cache))
    loaded = ImageClassifier.load(out, device="cpu")
    after = loaded.predict_proba(images)
    np.testing.assert_allclose(after, before, atol=1e-6, rtol=0)
    assert loaded.classes_ == fitted.classes_
    assert loaded.predict(images) == fitted.predict(images)
    assert list((fresh_cache / "onnx").glob("*.onnx")), "the loaded model should have exported its own backbone"


def test_saved_weights_are_backbone_and_head(fitted, model_dir, tiny_weights):
    from safetensors.numpy import load_file

    tensors = load_file(str(model_dir / WEIGHTS_FILE))
    original = load_file(str(tiny_weights))
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    assert set(tensors) == {f"backbone.{k}" for k in backbone} | {f"head.{k}" for k in head}
    assert backbone.keys() == original.keys()
    assert all(np.array_equal(backbone[k], original[k]) for k in original)
    assert head.keys() == fitted.head_state_.keys()
    assert all(np.array_equal(head[k], fitted.head_state_[k]) for k in head)


def test_metadata_describes_the_model(fitted, model_dir):
    meta = json.loads((model_dir / META_FILE).read_text())
    assert meta["format"] == artifact.FORMAT and meta["format_version"] == artifact.PLAIN_FORMAT_VERSION
    assert meta["classes"] == ["cat", "dog", "fish"]
    spec = resolve(TINY_BACKBONE)
    assert meta["backbone"]["name"] == meta["backbone"]["timm_name"] == TINY_BACKBONE
    assert PreprocessConfig.from_dict(meta["backbone"]["preprocess"]) == spec.preprocess
    assert meta["backbone"]["preprocess"]["input_size"] == 160
    assert meta["backbone"]["weights_id"] == fitted.frozen_.weights_id
    assert HeadConfig.from_dict(meta["head"]) == fitted.head_config_
    assert meta["head"]["hidden"] == [16] and meta["head"]["n_classes"] == 3
    assert meta["fit"]["train_config"] == json.loads(json.dumps(fitted.train_config_.to_dict()))
    assert meta["fit"]["train_config"]["epochs"] == 10
    assert meta["fit"]["metrics"]["val"]["accuracy"] == pytest.approx(fitted.val_metrics_.accuracy)
    assert len(meta["fit"]["history"]["train_loss"]) == len(fitted.history_.train_loss)
    assert meta["fit"]["counts"]["train"] == {"cat": 5, "dog": 5, "fish": 5}
    for package in ("python", "headstart", "torch", "timm", "onnxruntime", "numpy"):
        assert isinstance(meta["versions"].get(package), str), package


def test_artifact_load_is_lazy_about_the_backbone(model_dir):
    art = artifact.load(model_dir)
    assert art.backbone_state is None and "mean" in art.head_state
    full = artifact.load(model_dir, with_backbone=True)
    assert "conv_stem.weight" in full.backbone_state


# --- refusing damaged models -----------------------------------------------------------------------------------

def _edit_meta(model_dir: Path, edit) -> None:
    path = model_dir / META_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _expect_refusal(model_dir: Path, *needles: str) -> str:
    with pytest.raises(ArtifactError) as err:
        artifact.load(model_dir)
    with pytest.raises(ArtifactError) as err_api:
        ImageClassifier.load(model_dir)
    assert str(err_api.value) == str(err.value)
    return assert_one_line(str(err.value), *needles)


def test_missing_directory(tmp_path):
    _expect_refusal(tmp_path / "nowhere", "no such model directory")


def test_missing_weights(model_dir):
    (model_dir / WEIGHTS_FILE).unlink()
    _expect_refusal(model_dir, WEIGHTS_FILE)


def test_missing_metadata(model_dir):
    (model_dir / META_FILE).unlink()
    _expect_refusal(model_dir, META_FILE)


GARBAGE = [b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage", b'{"format": "headstart-model",', b""]


@pytest.mark.parametrize("content", GARBAGE)
def test_garbage_metadata(model_dir, content):
    (model_dir / META_FILE).write_bytes(content)
    _expect_refusal(model_dir, META_FILE)


DAMAGE = {
    "wrong format": lambda m: m.update(format="keras-model"),
    "no format": lambda m: m.pop("format"),
    "not an object": None,
    "newer format version": lambda m: m.update(format_version=99),
    "format version not a number": lambda m: m.update(format_version="one"),
    "no classes": lambda m: m.pop("classes"),
    "one class": lambda m: m.update(classes=["cat"]),
    "classes not names": lambda m: m.update(classes=[1, 2, 3]),
    "head not matching classes": lambda m: m.update(classes=["a", "b"]),
    "head fields missing": lambda m: m.update(head={"in_features": 400}),
    "head not an object": lambda m: m.update(head="linear"),
    "backbone fields missing": lambda m: m["backbone"].pop("preprocess"),
    "backbone not an object": lambda m: m.update(backbone="test_efficientnet"),
    "weights id missing": lambda m: m["backbone"].pop("weights_id"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_metadata(model_dir, damage):
    if DAMAGE[damage] is None:
        (model_dir / META_FILE).write_text(json.dumps(["headstart-model"]))
    else:
        _edit_meta(model_dir, DAMAGE[damage])
    _expect_refusal(model_dir)


def test_newer_format_says_upgrade(model_dir):
    _edit_meta(model_dir, lambda m: m.update(format_version=artifact.FORMAT_VERSION + 1))
    _expect_refusal(model_dir, "upgrade")


@pytest.mark.parametrize("corruption", ["random bytes", "truncated", "header only"])
def test_corrupt_weights(model_dir, corruption):
    path = model_dir / WEIGHTS_FILE
    data = path.read_bytes()
    if corruption == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif corruption == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        header_len = int.from_bytes(data[:8], "little")
        path.write_bytes(data[: 8 + header_len])
    _expect_refusal(model_dir, WEIGHTS_FILE)


def test_weights_without_head(model_dir):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model_dir / WEIGHTS_FILE))
    save_file({k: v for k, v in tensors.items() if not k.startswith("head.")}, str(model_dir / WEIGHTS_FILE))
    _expect_refusal(model_dir)


# --- never unpickling ------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates the marker file: proof that something ran code from the model directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write_pickles(model_dir: Path, marker: Path) -> None:
    import torch

    payload = {"head.mean": _Payload(marker), "state_dict": _Payload(marker)}
    (model_dir / "model.pkl").write_bytes(pickle.dumps(payload))
    torch.save(payload, model_dir / "model.pt")
    # Sanity: the payload really does run when unpickled.
    probe = marker.with_name("probe")
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()


def test_pickle_checkpoint_instead_of_safetensors_is_never_loaded(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    (model_dir / WEIGHTS_FILE).unlink()
    _write_pickles(model_dir, marker)
    _expect_refusal(model_dir, WEIGHTS_FILE)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_never_unpickled(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    (model_dir / WEIGHTS_FILE).write_bytes(pickle.dumps({"head.mean": _Payload(marker)}))
    _expect_refusal(model_dir, WEIGHTS_FILE)
    assert not marker.exists()


# --- the weights must match the record (built without training: a random head on the tiny backbone) ----------

def synthetic_artifact(tiny_weights: Path, classes=("cat", "dog", "fish"), hidden=(), seed: int = 0,
                       shift: float = 0.0) -> artifact.Artifact:
    """A complete, valid model without training: the tiny backbone's tensors (plus `shift`) and a random head."""
    from helpers_models import TINY_DIM
    from safetensors.numpy import load_file

    from headstart.backbones.weights import weights_fingerprint

    cfg = HeadConfig(TINY_DIM, len(classes), tuple(hidden), 0.2)
    rng = np.random.default_rng(seed)
    from headstart.heads.module import Head  # the layout the trainer writes, not the loader's idea of it

    head = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in Head(cfg).state_dict().items()}
    head["std"] = np.abs(head["std"]) + 0.5
    backbone = {k: v + np.asarray(shift).astype(v.dtype) for k, v in load_file(str(tiny_weights)).items()}
    record = artifact.ModelRecord(tuple(classes), resolve(TINY_BACKBONE), weights_fingerprint(tiny_weights), cfg)
    return artifact.Artifact(record, head, backbone)


@pytest.fixture
def quick_dir(tiny_weights, tmp_path) -> Path:
    return artifact.save(synthetic_artifact(tiny_weights, hidden=(8,)), tmp_path / "quick")


def _edit_weights(model_dir: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model_dir / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(model_dir / WEIGHTS_FILE))


def _nan_tail(t: dict) -> None:
    t["head.layers.4.weight"][-1, :] = np.nan


def _zeroed_std_tail(t: dict) -> None:
    t["head.std"][-50:] = 0.0


WEIGHTS_DAMAGE = {
    "head for two classes": (lambda t: t.update({"head.layers.4.weight": t["head.layers.4.weight"][:2],
                                                 "head.layers.4.bias": t["head.layers.4.bias"][:2]}), "layers.4"),
    "hidden width differs": (lambda t: t.update({"head.layers.1.weight": t["head.layers.1.weight"][:4]}), "layers.1"),
    "linear head for a hidden config": (lambda t: [t.pop(k) for k in ("head.layers.4.weight", "head.layers.4.bias")],
                                        "lacks"),
    "extra head tensor": (lambda t: t.update({"head.layers.7.weight": np.zeros((3, 3), np.float32)}), "layers.7"),
    "mean of other length": (lambda t: t.update({"head.mean": t["head.mean"][:10]}), "mean"),
    "NaN tail in the head": (_nan_tail, "NaN"),
    "inf in the backbone": (lambda t: t["backbone.conv_stem.weight"].__setitem__((0, 0, 0, 0), np.inf), "conv_stem"),
    "zeroed std tail": (_zeroed_std_tail, "std"),
    "no backbone": (lambda t: [t.pop(k) for k in [k for k in t if k.startswith("backbone.")]], "backbone"),
}


@pytest.mark.parametrize("damage", WEIGHTS_DAMAGE)
def test_weights_that_do_not_match_the_record_are_refused(quick_dir, damage):
    edit, needle = WEIGHTS_DAMAGE[damage]
    artifact.load(quick_dir)  # valid before the damage
    _edit_weights(quick_dir, edit)
    _expect_refusal(quick_dir, needle)


@pytest.mark.parametrize("classes, needle", [(["cat", "cat", "fish"], "cat"), (["cat", "", "fish"], "empty"),
                                             (["cat", "  ", "fish"], "empty")])
def test_duplicate_or_empty_class_names_are_refused(quick_dir, classes, needle):
    _edit_meta(quick_dir, lambda m: m.update(classes=classes))
    _expect_refusal(quick_dir, needle)


@pytest.mark.parametrize("head", [{"in_features": 1e400}, {"n_classes": -3}, {"hidden": [0]}, {"dropout": float("nan")},
                                  {"hidden": "16"}, {"in_features": 0}])
def test_impossible_head_configs_are_refused(quick_dir, head):
    _edit_meta(quick_dir, lambda m: m["head"].update(head))
    _expect_refusal(quick_dir)


def test_a_synthetic_model_loads_and_predicts(quick_dir, tiny_cache, image_folder):
    clf = ImageClassifier.load(quick_dir, device="cpu")
    proba = clf.predict_proba(_images(image_folder)[:2])
    assert proba.shape == (2, 3) and np.isfinite(proba).all()


# --- a save killed at any point leaves the old complete model or the new complete one ------------------------

_KILLING_SAVE = r"""
import os, signal, sys
from pathlib import Path
import safetensors.numpy
from headstart.serve import artifact

source, target, kill_at, half = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "half"
new = artifact.load(source, with_backbone=True)
calls = 0

def killing(name, real):
    def step(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            if half and name == "save_file":  # die half way through writing the weights
                real(*args, **kwargs)
                path = Path(args[1])
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return step

for name in ("mkdir", "rename", "replace", "fsync", "rmdir"):
    setattr(os, name, killing(name, getattr(os, name)))
safetensors.numpy.save_file = killing("save_file", safetensors.numpy.save_file)
Path.write_bytes = killing("write_bytes", Path.write_bytes)
artifact.save(new, target)
print(calls)
"""


def _same_model(art: artifact.Artifact, other: artifact.Artifact) -> bool:
    return (art.record.classes == other.record.classes and art.head_state.keys() == other.head_state.keys()
            and all(np.array_equal(art.head_state[k], other.head_state[k]) for k in art.head_state)
            and all(np.array_equal(art.backbone_state[k], other.backbone_state[k]) for k in art.backbone_state))


def test_a_save_killed_at_any_point_leaves_the_old_or_the_new_model(tiny_weights, tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys

    old_art = synthetic_artifact(tiny_weights, hidden=(8,), seed=1)
    new_art = synthetic_artifact(tiny_weights, classes=("ant", "bee", "moth", "wasp"), seed=2, shift=1.0)
    pristine = artifact.save(old_art, tmp_path / "pristine")
    source = artifact.save(new_art, tmp_path / "source")
    old, new = artifact.load(pristine, with_backbone=True), artifact.load(source, with_backbone=True)
    outcomes = []
    for kill_at in range(1, 40):
        for mode in ("whole", "half"):
            target = tmp_path / f"model-{kill_at}-{mode}"
            shutil.copytree(pristine, target)
            proc = subprocess.run([sys.executable, "-c", _KILLING_SAVE, str(source), str(target), str(kill_at), mode],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode in (0, -9), proc.stderr
            # A read-only copy of what the kill left: loading cannot complete a committed save there.
            frozen_copy = tmp_path / f"copy-{kill_at}-{mode}"
            shutil.copytree(target, frozen_copy)
            with monkeypatch.context() as mp:
                mp.setattr(artifact, "_complete_save", lambda d: (_ for _ in ()).throw(PermissionError(13, "ro")),
                           raising=False)
                seen_read_only = artifact.load(frozen_copy, with_backbone=True)
            seen = artifact.load(target, with_backbone=True)  # completes a committed save
            assert _same_model(seen, old) or _same_model(seen, new), (kill_at, mode)
            assert _same_model(seen_read_only, seen), (kill_at, mode)
            assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".saving")) == [META_FILE,
                                                                                               WEIGHTS_FILE]
            outcomes.append("new" if _same_model(seen, new) else "old")
            artifact.save(old_art, target)  # and the next save works from whatever the kill left
            assert _same_model(artifact.load(target, with_backbone=True), old)
            assert sorted(p.name for p in target.iterdir()) == [META_FILE, WEIGHTS_FILE]
        if proc.returncode == 0:  # the save ran to its end: every point before it was a kill point
            break
    assert proc.returncode == 0 and outcomes[-1] == "new"
    assert "old" in outcomes and outcomes.count("new") >= 3, outcomes
    assert len(outcomes) >= 16, outcomes
    print("kill points survived:", len(outcomes), outcomes)


# --- --weights: safetensors, or a torch file read only with weights_only=True --------------------------------

def test_a_model_directory_with_pickles_beside_it_never_runs_them(quick_dir, tiny_cache, tmp_path, image_folder):
    marker = tmp_path / "pwned"
    _write_pickles(quick_dir, marker)
    clf = ImageClassifier.load(quick_dir, device="cpu")  # the pickles are not part of the model: never opened
    clf.predict(_images(image_folder)[:1])
    assert not marker.exists()


def test_a_torch_zip_disguised_as_safetensors_is_refused_without_running(quick_dir, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    torch.save({"head.mean": _Payload(marker)}, quick_dir / WEIGHTS_FILE)
    _expect_refusal(quick_dir, WEIGHTS_FILE)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_weights_with_a_payload_are_refused_without_running(tmp_path, suffix):
    import torch

    from headstart.backbones.weights import as_safetensors, read_state_dict
    from headstart.errors import WeightsError

    marker = tmp_path / "pwned"
    path = tmp_path / f"weights{suffix}"
    torch.save({"state_dict": {"conv_stem.weight": _Payload(marker)}}, path)
    for read in (read_state_dict, as_safetensors):
        with pytest.raises(WeightsError) as err:
            read(path)
        assert_one_line(str(err.value), str(path))
    assert not marker.exists()


def test_torch_weights_of_plain_tensors_are_read_and_converted_once(tiny_weights, tmp_path):
    import torch
    from safetensors.torch import load_file

    from headstart.backbones.weights import as_safetensors, read_state_dict

    original = load_file(str(tiny_weights))
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": original, "epoch": 3}, path)  # a typical training checkpoint
    assert read_state_dict(path).keys() == original.keys()
    converted = as_safetensors(path)
    assert converted.suffix == ".safetensors" and as_safetensors(path) == converted
    again = load_file(str(converted))
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)
    assert as_safetensors(tiny_weights) == tiny_weights


def test_a_companion_round_trips_and_a_model_missing_its_tensors_is_refused(model_dir, tmp_path):
    """A record naming a companion backbone keeps it whole; one whose weights lack the companion's tensors is
    refused in one line, and a record without one loads with none (every model saved before companions)."""
    from safetensors.numpy import load_file, save_file

    art = artifact.load(model_dir, with_backbone=True)
    assert art.record.companion is None and art.companion_state is None
    record = replace(art.record, companion=art.record.backbone, companion_weights_id="abc")
    both = artifact.save(artifact.Artifact(record, art.head_state, art.backbone_state,
                                           companion_state=art.backbone_state), tmp_path / "both")
    back = artifact.load(both, with_backbone=True)
    assert back.record.companion == art.record.backbone and back.record.companion_weights_id == "abc"
    # written as format 3, so a headstart that reads format 2 at most refuses it instead of mis-sizing the head
    assert json.loads((both / META_FILE).read_text())["format_version"] == 3
    assert json.loads((model_dir / META_FILE).read_text())["format_version"] == 2
    assert back.companion_state.keys() == art.backbone_state.keys()
    tensors = {k: v for k, v in load_file(str(both / WEIGHTS_FILE)).items() if not k.startswith("companion.")}
    save_file(tensors, str(both / WEIGHTS_FILE))
    with pytest.raises(ArtifactError, match="companion") as err:
        artifact.load(both)
    assert_one_line(str(err.value))
