"""The one atomic writer (`paths.atomic_path`) and the one content key (`paths.store_key`) that names every
cached entry: feature caches, boundary stores and ONNX exports."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from helpers_models import TINY_BACKBONE
from headstart import paths
from headstart.backbones.registry import resolve
from headstart.cache import boundary
from headstart.cache.boundary import STORE_FORMAT, BoundaryStore, bottom_engine
from headstart.cache.features import FeatureCache
from headstart.paths import VERSIONS, atomic_path, atomic_write_bytes, cache_root, store_key, store_path
from headstart.runtime.export import onnx_path_for
from headstart.runtime.frozen import FrozenBackbone


def _frozen(weights_id: str = "0123456789abcdef") -> FrozenBackbone:
    # No weights are read: keys and paths depend on the fingerprint alone.
    return FrozenBackbone(resolve(TINY_BACKBONE), Path("unused.safetensors"), weights_id)


def _litter(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- atomic_path ---------------------------------------------------------------------------------------------

def test_atomic_path_replaces_the_target_when_the_block_succeeds(tmp_path):
    target = tmp_path / "new" / "folder" / "file.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and not target.exists()
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first" and _litter(target.parent) == []
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and _litter(target.parent) == []


@pytest.mark.parametrize("failure", [RuntimeError("writer failed"), KeyboardInterrupt()])
def test_a_failed_block_leaves_the_old_file_and_no_temporary_file(tmp_path, failure):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(failure)), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise failure
    assert target.read_bytes() == b"old"
    assert _litter(tmp_path) == []


def test_a_failed_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
    def replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(paths.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "file.bin", b"new")
    assert list(tmp_path.iterdir()) == []


def test_the_target_may_be_renamed_in_its_folder_but_not_moved_out(tmp_path):
    writer = atomic_path(tmp_path / "state.safetensors")
    with writer as tmp:
        tmp.write_bytes(b"x")
        writer.target = tmp_path / "state-abc.safetensors"  # named by content, known only once written
    assert [p.name for p in tmp_path.iterdir()] == ["state-abc.safetensors"]

    (tmp_path / "elsewhere").mkdir()
    writer = atomic_path(tmp_path / "other.bin")
    with pytest.raises(ValueError, match="folder it started in"), writer as tmp:
        tmp.write_bytes(b"y")
        writer.target = tmp_path / "elsewhere" / "other.bin"
    assert _litter(tmp_path) == [] and list((tmp_path / "elsewhere").iterdir()) == []


# --- store_key -----------------------------------------------------------------------------------------------

def test_the_key_changes_with_every_part_and_with_the_version(monkeypatch):
    parts = dict(timm="a", w="b", pre={"input_size": 160})
    key = store_key("features", parts)
    assert key == store_key("features", dict(reversed(parts.items())))  # order does not matter
    assert len(key) == paths.KEY_CHARS and int(key, 16) >= 0
    for name in parts:
        assert store_key("features", {**parts, name: "other"}) != key, name
    assert store_key("features", {**parts, "extra": 1}) != key
    assert store_key("features", {**parts, "pre": {"input_size": 161}}) != key
    monkeypatch.setitem(VERSIONS, "features", VERSIONS["features"] + 1)
    assert store_key("features", parts) != key


def test_every_kind_has_a_version_and_callers_cannot_set_it():
    assert set(VERSIONS) == {"features", "boundary", "export"}
    with pytest.raises(ValueError, match="version"):
        store_key("boundary", dict(store_version=1))
    with pytest.raises(ValueError, match="version"):
        store_key("features", dict(v=1))


def test_keys_are_the_ones_caches_already_on_disk_were_written_under():
    """The hashes written before the key was shared: existing feature caches and boundary stores stay valid."""
    def legacy(desc: dict) -> str:
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]

    frozen = _frozen()
    pre = frozen.spec.preprocess.to_dict()
    assert frozen.cache_key() == legacy(dict(v=2, timm=frozen.spec.timm_name, w=frozen.weights_id, pre=pre))
    parts = dict(weights="w", boundary=3, views=2, augment="light", seed=0, pre=pre, train=["ab"], val=[])
    # Boundary stores carry their layout's format since pixel views became 8-bit (format 2): float16 pixel stores
    # written before must not be read as bytes, so those folders are left behind once, by design.
    assert BoundaryStore(parts).dir.name == legacy(dict(parts, format=STORE_FORMAT, store_version=2))


# --- what is named by it -------------------------------------------------------------------------------------

def test_feature_cache_and_boundary_store_folders_come_from_the_store(tmp_path):
    frozen = _frozen()
    cache = FeatureCache(frozen)
    assert cache.dir == cache_root() / "features" / frozen.cache_key()
    assert cache.dir == store_path("features", frozen.feature_key_parts())
    assert FeatureCache(frozen, root=tmp_path / "f").dir == tmp_path / "f" / frozen.cache_key()
    assert FeatureCache(_frozen("fedcba9876543210")).dir != cache.dir

    parts = dict(weights="w", boundary=3)
    keyed = {**parts, "format": STORE_FORMAT}
    store = BoundaryStore(parts)
    assert store.dir == cache_root() / "boundary" / store_key("boundary", keyed) and store.dir.is_dir()
    assert BoundaryStore(parts, root=tmp_path / "b").dir == tmp_path / "b" / store_key("boundary", keyed)


def test_onnx_exports_are_named_by_the_store_and_move_with_the_export_version(monkeypatch):
    frozen = _frozen()
    path = onnx_path_for(frozen.spec, frozen.weights_id)
    assert path.parent == cache_root() / "onnx" and path.suffix == ".onnx"
    assert path.name.startswith(f"{frozen.spec.timm_name}-{frozen.weights_id}-")
    assert onnx_path_for(frozen.spec, "fedcba9876543210") != path
    monkeypatch.setitem(VERSIONS, "export", VERSIONS["export"] + 1)
    assert onnx_path_for(frozen.spec, frozen.weights_id) != path


def test_the_frozen_bottom_export_is_named_by_the_store(monkeypatch):
    exported: list[Path] = []
    monkeypatch.setattr("headstart.backbones.pooled.FrozenBottom", lambda net, b: net)
    monkeypatch.setattr(boundary, "export_onnx", lambda model, size, target, names: exported.append(target))
    monkeypatch.setattr(boundary, "OnnxEngine", lambda path: path)
    pre = _frozen().spec.preprocess

    path = bottom_engine(object(), 3, "w", pre)
    assert exported == [path] and path.parent == cache_root() / "onnx"
    assert path.name.startswith(f"bottom-w-b3-{pre.input_size}px-") and path.suffix == ".onnx"
    assert bottom_engine(object(), 2, "w", pre) != path
    monkeypatch.setitem(VERSIONS, "export", VERSIONS["export"] + 1)
    assert bottom_engine(object(), 3, "w", pre) != path
