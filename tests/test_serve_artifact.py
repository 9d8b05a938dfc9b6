"""The saved model: a round trip predicts identically, the metadata says everything needed to rebuild and audit
it, and loading refuses anything damaged or unsafe with a one-line ArtifactError (never unpickling)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_BACKBONE, assert_one_line
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
    assert meta["format"] == artifact.FORMAT and meta["format_version"] == artifact.FORMAT_VERSION
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
