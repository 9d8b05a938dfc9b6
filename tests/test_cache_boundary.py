"""cache.boundary: the exported frozen bottom agrees with torch, pixels are stored when every stage trains, and
the boundary store fills once, reopens, and resumes after a crash mid-fill."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_images import make_image_folder
from helpers_models import N_STAGES, CountingEngine

torch = pytest.importorskip("torch")

from headstart.cache.boundary import BoundaryStore, bottom_engine  # noqa: E402
from headstart.train import finetune as ft  # noqa: E402
from helpers_finetune import PRE, _frozen, _images  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest: the tiny model's steps, one thread


# --- the exported bottom ------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [N_STAGES - 2, 1])  # the session's export (--unfreeze 2); no taps below
def test_exported_bottom_matches_torch(tiny_weights, ft_cache, b):
    frozen = _frozen(tiny_weights)
    net = frozen.build_torch()
    engine = bottom_engine(net, b, frozen.weights_id, PRE)
    x = torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h, taps = net.forward_bottom(x, b)
    got_h, got_taps = engine.run_all(x.numpy())
    assert got_h.shape == tuple(h.shape) and got_taps.shape == tuple(taps.shape)
    assert (taps.shape[1] > 0) == (b > N_STAGES - 3)
    np.testing.assert_allclose(got_h, h.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_taps, taps.numpy(), atol=1e-4, rtol=0)


def test_when_every_stage_trains_the_store_holds_pixels_and_the_stem_runs_per_batch(tiny_weights, ft_cache):
    frozen = _frozen(tiny_weights)
    net = frozen.build_torch()
    x = np.random.default_rng(4).normal(size=(3, 3, 96, 96)).astype(np.float32)
    stored, taps = bottom_engine(net, 0, frozen.weights_id, PRE).run_all(x)
    assert stored is x and taps.shape == (3, 0)
    assert not list((ft_cache / "onnx").glob("bottom-*-b0-*"))  # no stem exported to ONNX Runtime
    with torch.no_grad():
        full = net(torch.from_numpy(x))
    top = ft.top_features(net, 0, stored[:, None], taps[:, None])
    assert torch.allclose(top, full, atol=1e-5, rtol=0)


# --- the boundary store --------------------------------------------------------------------------------------


@pytest.fixture
def store_setup(tiny_weights, ft_cache, tmp_path):
    frozen = _frozen(tiny_weights)
    engine = bottom_engine(frozen.build_torch(), N_STAGES - 2, frozen.weights_id, PRE)
    paths = _images(make_image_folder(tmp_path / "photos", per_class=4, size=(72, 56)))
    return engine, paths


def _fill(store, paths, engine, progress=None):
    return store.fill("train", paths, 2, "light", 0, PRE, engine, progress, batch_images=4)


def test_boundary_store_fills_once_and_reopens(store_setup, tmp_path):
    engine, paths = store_setup
    key = dict(test="reopen")
    counting = CountingEngine(engine)
    ticks: list[int] = []
    assert _fill(BoundaryStore(key, tmp_path / "store"), paths, counting, ticks.append) == []
    assert counting.calls == 3 and sum(ticks) == len(paths)
    acts, taps, ok = BoundaryStore(key, tmp_path / "store").arrays("train")
    assert acts.shape[:2] == (12, 2) and acts.dtype == np.float16 and taps.shape[:2] == (12, 2) and ok.all()
    assert not np.array_equal(acts[:, 0], acts[:, 1])  # two different augmented views
    acts, taps = np.array(acts), np.array(taps)

    again = CountingEngine(engine)
    reopened = BoundaryStore(key, tmp_path / "store")
    ticks.clear()
    assert _fill(reopened, paths, again, ticks.append) == []
    assert again.calls == 0 and sum(ticks) == len(paths)
    acts2, taps2, _ = reopened.arrays("train")
    assert np.array_equal(acts2, acts) and np.array_equal(taps2, taps)


def test_boundary_store_resumes_after_a_crash_mid_fill(store_setup, tmp_path):
    engine, paths = store_setup
    reference = BoundaryStore(dict(test="crash"), tmp_path / "ref")
    _fill(reference, paths, engine)
    ref_acts, ref_taps, _ = (np.array(a) for a in reference.arrays("train"))

    store = BoundaryStore(dict(test="crash"), tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fill(store, paths, CountingEngine(engine, fail_after=1))
    progress = json.loads((store.dir / "progress.json").read_text())
    done = progress["train"]["done"]
    assert 0 < done < len(paths)
    # Everything progress.json claims is on disk, identical to an uninterrupted fill.
    acts = np.load(store.dir / "train.acts.npy", mmap_mode="r")
    taps = np.load(store.dir / "train.taps.npy", mmap_mode="r")
    assert np.array_equal(acts[:done], ref_acts[:done]) and np.array_equal(taps[:done], ref_taps[:done])

    resumed = CountingEngine(engine)
    assert _fill(BoundaryStore(dict(test="crash"), tmp_path / "crashed"), paths, resumed) == []
    assert resumed.calls == -(-(len(paths) - done) // 4)  # only the missing batches
    acts, taps, ok = store.arrays("train")
    assert ok.all() and np.array_equal(acts, ref_acts) and np.array_equal(taps, ref_taps)


def test_boundary_store_crash_before_any_chunk_claims_nothing(store_setup, tmp_path):
    engine, paths = store_setup
    store = BoundaryStore(dict(test="early"), tmp_path / "store")
    with pytest.raises(RuntimeError):
        _fill(store, paths, CountingEngine(engine, fail_after=0))
    progress = store.dir / "progress.json"
    assert not progress.exists() or json.loads(progress.read_text()).get("train", {}).get("done", 0) == 0


# --- 8-bit pixel views and the store's share of resident memory --------------------------------------------


def _rss_file_kib() -> int:
    """File-backed resident memory of this process (a memory-mapped store's touched pages count here)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_a_pixel_store_holds_8_bit_views_that_read_back_as_the_normalised_float_views(tmp_path):
    from headstart.cache.boundary import PixelViews
    from headstart.data.imageio import load_rgb
    from headstart.vision.augment import augmented_view, view_seed

    paths = _images(make_image_folder(tmp_path / "photos", per_class=2, size=(72, 56)))
    store = BoundaryStore(dict(test="pixels"), tmp_path / "store")
    assert store.fill("train", paths, 2, "light", 5, PRE, PixelViews(), batch_images=4) == []
    raw = np.load(store.dir / "train.acts.npy", mmap_mode="r")
    assert raw.dtype == np.uint8 and raw.shape == (len(paths), 2, 3, PRE.input_size, PRE.input_size)
    acts, taps, ok = store.arrays("train", PRE)
    assert ok.all() and acts.dtype == np.float32 and taps.shape == (len(paths), 2, 0)
    for i in (0, len(paths) - 1):
        for v in (0, 1):
            want = augmented_view(load_rgb(paths[i]), PRE, "light", view_seed(5, i, v))
            assert np.array_equal(acts[np.array([i]), v][0], want)  # as training indexes it: rows, then a view
    with pytest.raises(ValueError, match="preprocessing config"):
        store.arrays("train")  # 8-bit pixels are never handed out un-normalised


def test_unreadable_rows_are_left_out_by_index_without_copying_the_store(tmp_path):
    from headstart.cache.boundary import StoreArray

    raw = np.lib.format.open_memmap(tmp_path / "a.npy", "w+", np.float16, (6, 2, 3))
    raw[:] = np.arange(36, dtype=np.float16).reshape(6, 2, 3)
    kept = StoreArray(raw).take(np.array([0, 2, 5]))
    assert kept.shape == (3, 2, 3) and len(kept) == 3 and kept.raw is raw
    assert np.array_equal(kept[np.array([1, 2]), 1], np.asarray(raw)[[2, 5], 1])
    assert np.array_equal(kept[0:2, 0], np.asarray(raw)[[0, 2], 0])
    assert np.array_equal(np.asarray(kept.take(np.array([2]))), np.asarray(raw)[[5]])


class BigActivations:
    """An engine whose outputs are large (2 MiB a view as float16), so a store's pages show in RSS."""

    def run_all(self, batch):
        return [np.full((len(batch), 1024, 32, 32), 0.5, np.float16), np.zeros((len(batch), 4), np.float32)]


def test_filling_a_store_keeps_about_one_chunk_of_it_resident(tmp_path):
    paths = _images(make_image_folder(tmp_path / "photos", per_class=6, size=(40, 40)))  # 18 images, 2 views
    store = BoundaryStore(dict(test="rss"), tmp_path / "store")
    start, peak = _rss_file_kib(), []
    store.fill("train", paths, 2, "none", 0, PRE, BigActivations(), lambda _: peak.append(_rss_file_kib()),
               batch_images=3)
    size_kib = (store.dir / "train.acts.npy").stat().st_size // 1024  # 72 MiB
    chunk_kib = size_kib * 3 // len(paths)  # 12 MiB
    assert max(peak) - start < 2 * chunk_kib, (max(peak) - start, size_kib)


def test_released_store_pages_leave_resident_memory(tmp_path):
    from headstart.cache.boundary import StoreArray, release

    path = tmp_path / "a.npy"
    np.save(path, np.ones((64, 1, 256, 1024), np.float16))  # 32 MiB
    acts = StoreArray(np.load(path, mmap_mode="r"))
    before = _rss_file_kib()
    assert acts[np.arange(64), 0].sum(dtype=np.float64) == 64 * 256 * 1024  # every page read, as an epoch reads them
    touched = _rss_file_kib()
    release(acts)
    after = _rss_file_kib()
    assert touched - before > 24 * 1024 and after - before < 4 * 1024, (before, touched, after)
    assert acts[np.arange(64), 0].sum(dtype=np.float64) == 64 * 256 * 1024  # still readable, mapped in again


def test_views_read_from_the_file_equal_the_mapped_reads(tmp_path):
    from headstart.cache.boundary import StoreArray, read_view

    raw = np.lib.format.open_memmap(tmp_path / "a.npy", "w+", np.uint8, (7, 3, 3, 4, 4))
    raw[:] = np.random.default_rng(0).integers(0, 256, raw.shape, dtype=np.uint8)
    raw.flush()
    for arr in (StoreArray(np.load(tmp_path / "a.npy", mmap_mode="r"), PRE),
                StoreArray(np.load(tmp_path / "a.npy", mmap_mode="r"), PRE).take(np.array([6, 1, 3, 4])),
                StoreArray(np.load(tmp_path / "a.npy", mmap_mode="r"))):
        for rows in (np.array([0, 2, 3]), slice(1, 4), slice(0, 0), np.array([], int)):
            for v in range(3):
                got = read_view(arr, rows, v)
                assert got.dtype == arr.dtype and np.array_equal(got, arr[rows, v]), (rows, v)
    plain = np.arange(24, dtype=np.float16).reshape(4, 2, 3)  # an array in memory is indexed as it is
    assert np.array_equal(read_view(plain, np.array([1, 3]), 1), plain[[1, 3], 1])
