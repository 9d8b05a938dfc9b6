"""cache.boundary: the exported frozen bottom agrees with torch, pixels are stored when every stage trains, and
the boundary store fills once, reopens, and resumes after a crash mid-fill."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import N_STAGES, make_image_folder

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


class CountingEngine:
    def __init__(self, engine, fail_after: int | None = None) -> None:
        self.engine, self.fail_after, self.calls = engine, fail_after, 0

    def run_all(self, batch):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.engine.run_all(batch)


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
