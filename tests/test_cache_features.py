"""cache.features: the on-disk feature cache extracts once, is keyed by content and by backbone weights,
reports unreadable images, survives a crash mid-extraction, and gathers shards (memory-mapped when large)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers_images import make_image
from helpers_models import TINY_DIM, direct_features
from headstart.cache import features
from headstart.cache.features import FeatureCache
from headstart.runtime.frozen import FrozenBackbone


class CountingFactory:
    """An engine factory that counts engines made and rows pushed through them."""

    def __init__(self, frozen: FrozenBackbone, fail_on_call: int | None = None) -> None:
        self.frozen, self.fail_on_call = frozen, fail_on_call
        self.engines = 0
        self.batches: list[int] = []

    def __call__(self):
        self.engines += 1
        engine = self.frozen.engine("cpu")

        def run(batch: np.ndarray) -> np.ndarray:
            if self.fail_on_call is not None and len(self.batches) + 1 >= self.fail_on_call:
                raise RuntimeError("simulated crash")
            self.batches.append(len(batch))
            return engine(batch)

        return run

    @property
    def rows(self) -> int:
        return sum(self.batches)


def test_cache_extracts_once_then_hits(frozen, photos):
    n = len(photos)
    factory = CountingFactory(frozen)
    cache = FeatureCache(frozen)
    got = cache.features_for(photos, factory)
    feats, readable, failures = got.features, got.readable, got.failures
    assert got.hits == 0
    assert (factory.engines, factory.rows) == (1, n)
    assert feats.shape == (n, TINY_DIM) and readable == list(range(n)) and failures == []
    # Row i is image i's features.
    np.testing.assert_allclose(feats, direct_features(frozen, photos), atol=1e-3, rtol=0)

    again = CountingFactory(frozen)
    fresh = FeatureCache(frozen)  # a new process: state comes from disk
    got = fresh.features_for(photos, again)
    feats2, readable2, failures2 = got.features, got.readable, got.failures
    assert got.hits == n
    assert (again.engines, again.rows) == (0, 0)
    assert readable2 == readable and failures2 == []
    np.testing.assert_array_equal(feats2, feats)

    # A different order or a subset gathers the same rows.
    order = [5, 0, 17, 3]
    sub = fresh.features_for([photos[i] for i in order], again).features
    np.testing.assert_array_equal(sub, feats[order])
    assert again.engines == 0


def test_cache_is_keyed_by_content(frozen, photos, tmp_path):
    n = len(photos)
    cache = FeatureCache(frozen)
    before = cache.features_for(photos, CountingFactory(frozen)).features

    changed = 4
    make_image((10, 10, 10), (64, 48), np.random.default_rng(99)).save(photos[changed], "JPEG")
    factory = CountingFactory(frozen)
    got = cache.features_for(photos, factory)
    after, readable = got.features, got.readable
    assert got.hits == n - 1
    assert (factory.engines, factory.rows) == (1, 1)
    assert readable == list(range(n))
    keep = [i for i in range(n) if i != changed]
    np.testing.assert_array_equal(after[keep], before[keep])
    assert not np.allclose(after[changed], before[changed], atol=1e-3)
    np.testing.assert_allclose(after[changed], direct_features(frozen, [photos[changed]])[0], atol=1e-3, rtol=0)

    # The same bytes under another name are the same image to the cache.
    copy = tmp_path / "renamed_copy.jpg"
    copy.write_bytes(photos[0].read_bytes())
    factory = CountingFactory(frozen)
    got = cache.features_for([copy], factory)
    again = got.features
    assert got.hits == 1 and factory.engines == 0
    np.testing.assert_array_equal(again[0], after[0])


def test_cache_is_per_backbone_weights(frozen, photos, tiny_weights, tmp_path):
    from safetensors.torch import load_file, save_file

    other_weights = tmp_path / "other.safetensors"
    state = load_file(str(tiny_weights))
    state["conv_head.weight"] = state["conv_head.weight"] * 2
    save_file(state, str(other_weights))
    other = FrozenBackbone.pretrained(frozen.spec, other_weights)
    assert other.cache_key() != frozen.cache_key()
    FeatureCache(frozen).features_for(photos[:3], CountingFactory(frozen))
    cache = FeatureCache(other)
    got = cache.features_for(photos[:3], lambda: (lambda b: np.zeros((len(b), TINY_DIM), np.float32)))
    assert got.hits == 0


def test_unreadable_images_are_reported_not_fatal(frozen, photos, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(photos[0].read_bytes()[: len(photos[0].read_bytes()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("these are my holiday notes, not a photo\n")
    good = photos[:4]
    paths = [good[0], corrupt, good[1], text, good[2], good[3]]

    for attempt in range(2):  # failures are not cached: the second run reports them again
        factory = CountingFactory(frozen)
        cache = FeatureCache(frozen)
        got = cache.features_for(paths, factory)
        feats, readable, failures = got.features, got.readable, got.failures
        assert readable == [0, 2, 4, 5]
        assert feats.shape == (4, TINY_DIM)
        reasons = dict(failures)
        assert set(reasons) == {corrupt, text}
        assert all(isinstance(r, str) and r and "\n" not in r for r in reasons.values())
        assert "truncated" in reasons[corrupt] or "corrupt" in reasons[corrupt]
        assert "cannot identify" in reasons[text]
        np.testing.assert_allclose(feats, direct_features(frozen, good), atol=1e-3, rtol=0)
        assert got.hits == (0 if attempt == 0 else 4)


def _visible_shards(cache_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    shards = []
    for keys_file in sorted(cache_dir.glob("*.keys.npy")):
        feats_file = keys_file.with_name(keys_file.name.replace(".keys.npy", ".feats.npy"))
        assert feats_file.exists(), f"{keys_file.name} has no features file"
        keys, feats = np.load(keys_file), np.load(feats_file)
        assert keys.dtype == np.uint8 and keys.shape[1] == 16
        assert feats.shape == (len(keys), TINY_DIM)
        shards.append((keys, feats))
    return shards


def test_crash_mid_extraction_leaves_only_complete_shards(frozen, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "SHARD_ROWS", 4)
    cache = FeatureCache(frozen)
    crashing = CountingFactory(frozen, fail_on_call=2)  # first batch goes through, the second raises
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.features_for(photos, crashing, batch_size=4)
    assert crashing.batches == [4]

    shards = _visible_shards(cache.dir)
    assert len(shards) == 1 and len(shards[0][0]) == 4
    assert not [p for p in cache.dir.iterdir() if not p.name.startswith(".") and not p.name.endswith(".npy")]

    factory = CountingFactory(frozen)
    got = cache.features_for(photos, factory, batch_size=4)
    resumed, readable, failures = got.features, got.readable, got.failures
    assert got.hits == 4
    assert factory.rows == len(photos) - 4
    assert len(_visible_shards(cache.dir)) == 1 + -(-(len(photos) - 4) // 4)

    clean_cache = FeatureCache(frozen, root=tmp_path / "clean")
    got = clean_cache.features_for(photos, CountingFactory(frozen))
    clean, clean_readable, clean_failures = got.features, got.readable, got.failures
    assert (readable, failures) == (clean_readable, clean_failures)
    np.testing.assert_allclose(resumed, clean, atol=1e-5, rtol=0)


def test_crash_between_features_and_keys_hides_the_shard(frozen, photos, monkeypatch):
    """Features are renamed into place first and keys last: a crash in between leaves an invisible shard."""
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".keys.npy"):
            raise OSError("disk full")
        return real_replace(src, dst)

    cache = FeatureCache(frozen)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        cache.features_for(photos[:3], CountingFactory(frozen))
    monkeypatch.setattr(os, "replace", real_replace)

    assert list(cache.dir.glob("*.feats.npy")) and not list(cache.dir.glob("*.keys.npy"))
    factory = CountingFactory(frozen)
    got = cache.features_for(photos[:3], factory)
    feats = got.features
    assert got.hits == 0 and factory.rows == 3
    assert len(_visible_shards(cache.dir)) == 1
    np.testing.assert_allclose(feats, direct_features(frozen, photos[:3]), atol=1e-3, rtol=0)


def test_many_small_shards_gather_like_one(frozen, photos, tmp_path, monkeypatch):
    whole = FeatureCache(frozen, root=tmp_path / "whole").features_for(photos, CountingFactory(frozen)).features
    monkeypatch.setattr(features, "SHARD_ROWS", 3)
    sharded_cache = FeatureCache(frozen, root=tmp_path / "sharded")
    sharded_cache.features_for(photos, CountingFactory(frozen), batch_size=3)
    assert len(_visible_shards(sharded_cache.dir)) == 6
    reread = FeatureCache(frozen, root=tmp_path / "sharded").features_for(photos, CountingFactory(frozen)).features
    np.testing.assert_allclose(reread, whole, atol=1e-5, rtol=0)


def test_large_gathers_are_memory_mapped_and_leave_no_file(frozen, photos, tmp_path, monkeypatch):
    cache = FeatureCache(frozen, root=tmp_path / "c")
    in_ram = cache.features_for(photos, CountingFactory(frozen)).features
    assert not isinstance(in_ram, np.memmap)
    monkeypatch.setattr(features, "_gather", functools.partial(features._gather, in_ram_bytes=16))
    mapped = FeatureCache(frozen, root=tmp_path / "c").features_for(photos, CountingFactory(frozen)).features
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, in_ram)
    scratch = features.cache_root() / "tmp"
    assert scratch.is_dir() and list(scratch.iterdir()) == []  # the backing file is anonymous


def test_a_batch_of_only_unreadable_files_is_survived(frozen, photos, tmp_path):
    """A whole batch of bad files (a folder of broken downloads, say) yields nothing to store, not a crash."""
    bad = []
    for i in range(5):
        path = tmp_path / f"broken{i}.jpg"
        path.write_text("not an image")
        bad.append(path)
    got = FeatureCache(frozen).features_for(bad + photos[:3], CountingFactory(frozen), batch_size=4)
    feats, readable, failures = got.features, got.readable, got.failures
    assert readable == [5, 6, 7] and feats.shape == (3, TINY_DIM)
    assert {p for p, _ in failures} == set(bad)


# --- files that cannot even be read for their key (issue 12, defect 1) ---------------------------------------


def _deny_reads_of(monkeypatch, denied: Path) -> None:
    """Reading `denied` fails with EACCES, as it does for a user without read permission (root reads every
    file whatever its mode, so the test denies it here). Every way in is denied: os.open, io.open and open."""
    import builtins
    import io

    def guard(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file) == denied:
                raise PermissionError(13, "Permission denied", str(file))
            return real(file, *args, **kwargs)
        return opener

    for module, name in ((os, "open"), (io, "open"), (builtins, "open")):
        monkeypatch.setattr(module, name, guard(getattr(module, name)))


def test_an_unreadable_file_is_a_failure_row_not_a_crash(frozen, photos, tmp_path, monkeypatch):
    denied = tmp_path / "locked.jpg"
    denied.write_bytes(photos[0].read_bytes())
    _deny_reads_of(monkeypatch, denied)
    paths = [photos[1], denied, photos[2]]
    ticks: list[int] = []
    got = FeatureCache(frozen).features_for(paths, CountingFactory(frozen), ticks.append)
    assert got.readable == [0, 2] and got.failures == [(denied, "permission denied")]
    assert sum(ticks) == len(paths)  # the failure is counted as done, as decode failures are
    np.testing.assert_allclose(got.features, direct_features(frozen, [photos[1], photos[2]]), atol=1e-3, rtol=0)


def test_a_named_pipe_is_a_failure_row_and_never_waits_for_a_writer(frozen, photos, tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    import threading
    import time

    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)

    def writer_if_anyone_waits():  # a reader stuck on the pipe would hang the suite: after 6 s, data and EOF
        time.sleep(6)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
            except OSError:
                time.sleep(0.05)
                continue
            os.write(fd, b"not an image")
            os.close(fd)
            return

    threading.Thread(target=writer_if_anyone_waits, daemon=True).start()
    start = time.monotonic()
    got = FeatureCache(frozen).features_for([pipe, photos[0]], CountingFactory(frozen))
    assert time.monotonic() - start < 5, "waited for a writer on the pipe"
    assert got.readable == [1] and got.failures == [(pipe, "not a regular file (named pipe)")]


_KEYED_WITHOUT_PERMISSION = """
import json, sys
from pathlib import Path
from headstart.backbones.registry import BackboneSpec
from headstart.cache.features import FeatureCache
from headstart.runtime.frozen import FrozenBackbone
from headstart.vision.preprocess import PreprocessConfig
spec, weights, *paths = sys.argv[1:]
spec = json.loads(spec)  # whole from the parent: resolving a timm name would import timm, seconds
spec = BackboneSpec(**{**spec, "preprocess": PreprocessConfig.from_dict(spec["preprocess"])})
frozen = FrozenBackbone.pretrained(spec, Path(weights))
got = FeatureCache(frozen).features_for([Path(p) for p in paths], lambda: frozen.engine("cpu"))
print(json.dumps({"readable": got.readable, "failures": [[str(p), r] for p, r in got.failures]}))
"""


def _without_read_override() -> list[str]:
    """A command prefix under which file modes are obeyed: none for a user, setpriv dropping root's
    capabilities (CAP_DAC_OVERRIDE reads any file) for root."""
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv: file modes cannot be made to deny a read here")
    prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-all"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop capabilities here: {probe.stderr.decode().strip()}")
    return prefix


def test_a_file_without_read_permission_is_a_failure_row_for_a_real_user(frozen, photos, tmp_path, tiny_weights):
    """The same as the test above, with a real mode 000 file, in a process that obeys file modes."""
    import subprocess
    import sys

    prefix = _without_read_override()
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(photos[0].read_bytes())
    locked.chmod(0)
    try:
        spec = json.dumps(dataclasses.asdict(frozen.spec))
        proc = subprocess.run([*prefix, sys.executable, "-c", _KEYED_WITHOUT_PERMISSION, spec, str(tiny_weights),
                               str(photos[1]), str(locked), str(photos[2])],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        locked.chmod(0o644)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"readable": [0, 2], "failures": [[str(locked),
                                                                                           "permission denied"]]}
