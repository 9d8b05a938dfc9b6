"""What is cached on disk, damaged there: a feature shard (truncated, garbled, keys and features of different
lengths), a cached ONNX export (the backbone's or the frozen bottom's), a training checkpoint (state.json or its
tensor file) and a boundary store (progress.json, a truncated or reshaped .npy). Each is detected: a cache entry
is dropped with a warning naming it and rebuilt, and the answer equals a clean run's; a damaged checkpoint is
refused in one line naming it (a resumed run continues the interrupted one exactly, or not at all) and the next
run without --resume writes a good one. Never a traceback, never a silent wrong answer.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers_cli import assert_one_line
from helpers_images import make_image_folder
from helpers_models import N_STAGES, CountingEngine, direct_features

torch = pytest.importorskip("torch")

from headstart.cache import features  # noqa: E402
from headstart.cache.boundary import BoundaryStore, bottom_engine  # noqa: E402
from headstart.cache.features import FeatureCache  # noqa: E402
from headstart.errors import CheckpointError  # noqa: E402
from headstart.runtime.engines import OnnxEngine  # noqa: E402
from headstart.runtime.export import onnx_path_for  # noqa: E402
from headstart.train import checkpoint  # noqa: E402
from headstart.train import finetune as ft  # noqa: E402
from headstart.vision.preprocess import load_for_model  # noqa: E402
from helpers_finetune import PRE, _frozen, _head_for, _images, _net, _synthetic_split  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest: the tiny model's steps, one thread

# The kinds of damage covered, by entry: a bench prints these (tests/test_faults.py has the kill points).
CORRUPTIONS = {
    "feature shard": ("truncated features", "truncated keys", "garbled keys", "keys/features row mismatch",
                      "features of another type"),
    "ONNX export": ("truncated", "garbage", "empty"),
    "checkpoint": ("state.json truncated", "state.json not UTF-8", "state.json a list",
                   "state.json without its tensor file's name", "tensor file truncated", "tensor file missing",
                   "tensor file garbled (digest matching)"),
    "boundary store": ("progress.json not JSON", "progress.json truncated", "progress.json a list",
                       "progress of another length", "acts truncated", "taps missing", "acts of another shape"),
}


class Counting:
    """An engine factory over the tiny backbone's ONNX engine, counting the rows it extracts."""

    def __init__(self, frozen) -> None:
        self.frozen, self.rows = frozen, 0

    def __call__(self):
        engine = self.frozen.engine("cpu")

        def run(batch):
            self.rows += len(batch)
            return engine(batch)

        return run


# --- feature shards ------------------------------------------------------------------------------------------


def _damage_shard(keys_file: Path, damage: str) -> None:
    feats_file = keys_file.with_name(keys_file.name.replace(".keys.npy", ".feats.npy"))
    if damage == "truncated features":
        feats_file.write_bytes(feats_file.read_bytes()[: feats_file.stat().st_size // 2])
    elif damage == "truncated keys":
        keys_file.write_bytes(keys_file.read_bytes()[:100])
    elif damage == "garbled keys":
        keys_file.write_bytes(bytes(range(256)) * 2)
    elif damage == "keys/features row mismatch":
        np.save(feats_file, np.load(feats_file)[:-1])
    elif damage == "features of another type":
        np.save(feats_file, np.load(feats_file).astype(np.float16))
    else:
        raise AssertionError(damage)


@pytest.mark.parametrize("damage", CORRUPTIONS["feature shard"])
def test_a_damaged_feature_shard_is_dropped_and_its_images_extracted_again(frozen, photos, monkeypatch, caplog,
                                                                           damage):
    monkeypatch.setattr(features, "SHARD_ROWS", 6)
    cache = FeatureCache(frozen)
    clean = cache.features_for(photos, Counting(frozen), batch_size=6).features
    shards = sorted(cache.dir.glob("*.keys.npy"))
    assert len(shards) == 3
    _damage_shard(shards[1], damage)

    factory = Counting(frozen)
    with caplog.at_level(logging.WARNING, logger="headstart.cache.features"):
        got = FeatureCache(frozen).features_for(photos, factory, batch_size=6)
    assert shards[1].name in caplog.text and "damaged feature shard" in caplog.text
    assert got.hits == len(photos) - 6 and factory.rows == 6 and got.failures == []
    np.testing.assert_allclose(got.features, clean, atol=1e-5, rtol=0)

    caplog.clear()
    again = Counting(frozen)
    with caplog.at_level(logging.WARNING, logger="headstart.cache.features"):
        assert FeatureCache(frozen).features_for(photos, again).hits == len(photos)  # rebuilt for good
    assert again.rows == 0 and "damaged" not in caplog.text


def test_leftovers_of_killed_writers_are_swept_once_old(frozen, photos):
    import os
    import time

    cache = FeatureCache(frozen)
    cache.features_for(photos[:3], Counting(frozen))
    orphan = cache.dir / "0123456789ab.feats.npy"  # its keys never landed
    np.save(orphan, np.zeros((2, 4), np.float32))
    temporary = cache.dir / ".0123456789ab.keys.npy.x1y2.tmp"
    temporary.write_bytes(b"half a shard")
    young = cache.dir / ".ba9876543210.keys.npy.z3w4.tmp"  # perhaps another process writing right now
    young.write_bytes(b"being written")
    hour_ago = time.time() - 2 * features.LEFTOVER_AGE_S
    for leftover in (orphan, temporary):
        os.utime(leftover, (hour_ago, hour_ago))
    assert FeatureCache(frozen).features_for(photos[:3], Counting(frozen)).hits == 3
    assert not orphan.exists() and not temporary.exists() and young.exists()


# --- cached ONNX exports -------------------------------------------------------------------------------------


def _damage_file(path: Path, damage: str) -> None:
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x08\xff\xff\xff\xff" + bytes(range(256)) * 8)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        raise AssertionError(damage)


@pytest.mark.parametrize("damage", CORRUPTIONS["ONNX export"])
def test_a_damaged_onnx_export_is_dropped_and_exported_again(frozen, photos, tiny_cache, monkeypatch, caplog, damage):
    export = onnx_path_for(frozen.spec, frozen.weights_id)
    good = export.read_bytes()
    _damage_file(export, damage)
    exported = []

    def export_again(model, input_size, target, *args, **kwargs):  # the real export, minus its half a minute
        exported.append(Path(target))
        Path(target).write_bytes(good)
        return target

    monkeypatch.setattr("headstart.runtime.frozen.export_onnx", export_again)
    with caplog.at_level(logging.WARNING, logger="headstart.runtime.export"):
        engine = frozen.engine("cpu")
    assert isinstance(engine, OnnxEngine) and exported == [export]
    assert str(export) in caplog.text and "damaged" in caplog.text
    batch = np.stack([load_for_model(p, frozen.spec.preprocess) for p in photos[:3]])
    np.testing.assert_allclose(engine(batch), direct_features(frozen, photos[:3]), atol=1e-3, rtol=0)


def test_a_damaged_bottom_export_is_dropped_and_exported_again(tiny_weights, ft_cache, monkeypatch, caplog):
    (path,) = (ft_cache / "onnx").glob("bottom-*.onnx")
    good = path.read_bytes()
    _damage_file(path, "truncated")
    exported = []

    def export_again(model, input_size, target, *args, **kwargs):
        exported.append(Path(target))
        Path(target).write_bytes(good)
        return target

    monkeypatch.setattr("headstart.cache.boundary.export_onnx", export_again)
    frozen = _frozen(tiny_weights)
    with caplog.at_level(logging.WARNING, logger="headstart.runtime.export"):
        engine = bottom_engine(frozen.build_torch(), N_STAGES - 2, frozen.weights_id, PRE)
    assert exported == [path] and path.name in caplog.text
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h, _ = frozen.build_torch().forward_bottom(x, N_STAGES - 2)
    np.testing.assert_allclose(engine.run_all(x.numpy())[0], h.numpy(), atol=1e-4, rtol=0)


# --- training checkpoints ------------------------------------------------------------------------------------


def _damage_checkpoint(directory: Path, damage: str) -> Path:
    """Damage the checkpoint in `directory`; returns the file the refusal must name."""
    meta_path = directory / checkpoint.META
    meta = json.loads(meta_path.read_text())
    tensors = directory / meta["tensors"]
    if damage == "state.json truncated":
        meta_path.write_bytes(meta_path.read_bytes()[:40])
    elif damage == "state.json not UTF-8":
        meta_path.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "state.json a list":
        meta_path.write_text("[1, 2, 3]")
    elif damage == "state.json without its tensor file's name":
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "tensors"}))
    elif damage == "tensor file truncated":
        tensors.write_bytes(tensors.read_bytes()[:64])
        return directory
    elif damage == "tensor file missing":
        tensors.unlink()
        return directory
    elif damage == "tensor file garbled (digest matching)":  # a writer's bug, say: the digest cannot tell
        import hashlib

        garbled = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}"
        tensors.write_bytes(garbled)
        meta_path.write_text(json.dumps({**meta, "tensors_sha256": hashlib.sha256(garbled).hexdigest()}))
        return tensors
    else:
        raise AssertionError(damage)
    return meta_path


@pytest.mark.parametrize("damage", CORRUPTIONS["checkpoint"])
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_it(tmp_path, damage):
    directory = tmp_path / "ck"
    checkpoint.save(directory, {"w": torch.arange(6.0)}, {"epoch": 2})
    named = _damage_checkpoint(directory, damage)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(directory)
    assert_one_line(str(err.value), str(named), "--resume")


def test_fine_tuning_refuses_a_damaged_checkpoint_and_a_run_without_resume_rebuilds_it(tiny_weights, tmp_path,
                                                                                       monkeypatch):
    from helpers_finetune import _interrupt_at_validation

    net = _net(tiny_weights)
    data = _synthetic_split(net, N_STAGES - 1, 6, seed=0)
    cfg = ft.FinetuneConfig(unfreeze=1, epochs=2, views=1, batch_size=4)
    ck = tmp_path / "ck"
    with monkeypatch.context() as mp:
        _interrupt_at_validation(mp, call=3)  # killed in epoch 2, after epoch 1's checkpoint
        with pytest.raises(KeyboardInterrupt):
            ft.finetune(net, _head_for(net), cfg, data, data, checkpoint_dir=ck)
    (ck / checkpoint.META).write_bytes((ck / checkpoint.META).read_bytes()[:50])
    with pytest.raises(CheckpointError) as err:
        ft.finetune(_net(tiny_weights), _head_for(net), cfg, data, data, checkpoint_dir=ck, resume=True)
    assert_one_line(" ".join(str(err.value).split()), "state.json", "damaged", "--resume")
    ft.finetune(_net(tiny_weights), _head_for(net), cfg, data, data, checkpoint_dir=ck)  # without --resume
    _, meta = checkpoint.load(ck)
    assert meta["epoch"] == cfg.epochs - 1


# --- boundary stores -----------------------------------------------------------------------------------------


def _fill(store, paths, engine):
    return store.fill("train", paths, 2, "light", 0, PRE, engine, None, batch_images=4)


def _damage_store(directory: Path, damage: str) -> str:
    """Damage a filled store; returns the name the warning must give."""
    progress = directory / "progress.json"
    acts, taps = directory / "train.acts.npy", directory / "train.taps.npy"
    if damage == "progress.json not JSON":
        progress.write_bytes(b"\x00\x01 not json")
    elif damage == "progress.json truncated":
        progress.write_bytes(progress.read_bytes()[:20])
    elif damage == "progress.json a list":
        progress.write_text("[]")
    elif damage == "progress of another length":
        state = json.loads(progress.read_text())
        state["train"]["ok"] = state["train"]["ok"][:-1] + [False, True]
        progress.write_text(json.dumps(state))
    elif damage == "acts truncated":
        acts.write_bytes(acts.read_bytes()[: acts.stat().st_size // 3])
        return acts.name
    elif damage == "taps missing":
        taps.unlink()
        return taps.name
    elif damage == "acts of another shape":
        np.save(acts, np.load(acts)[:, :1])
        return acts.name
    else:
        raise AssertionError(damage)
    return "progress.json"


@pytest.mark.parametrize("damage", CORRUPTIONS["boundary store"])
def test_a_damaged_boundary_store_is_filled_again(tiny_weights, ft_cache, tmp_path, caplog, damage):
    frozen = _frozen(tiny_weights)
    engine = bottom_engine(frozen.build_torch(), N_STAGES - 2, frozen.weights_id, PRE)
    paths = _images(make_image_folder(tmp_path / "photos", per_class=4, size=(72, 56)))
    reference = BoundaryStore(dict(test="damage"), tmp_path / "ref")
    _fill(reference, paths, engine)
    ref_acts, ref_taps, _ = (np.array(a) for a in reference.arrays("train"))

    shutil.copytree(reference.dir, tmp_path / "damaged" / reference.dir.name)
    store = BoundaryStore(dict(test="damage"), tmp_path / "damaged")
    named = _damage_store(store.dir, damage)
    counting = CountingEngine(engine)
    with caplog.at_level(logging.WARNING, logger="headstart.cache.boundary"):
        assert _fill(store, paths, counting) == []
    assert named in caplog.text and "again" in caplog.text
    assert counting.calls == -(-len(paths) // 4)  # every image computed again
    acts, taps, ok = store.arrays("train")
    assert len(ok) == len(paths) and ok.all()
    assert np.array_equal(acts, ref_acts) and np.array_equal(taps, ref_taps)
