"""runtime.frozen: the frozen backbone's ONNX engine agrees with torch, a failed export falls back to float32
torch (and is remembered), and the engine kind is part of the feature cache's key."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from helpers_models import TINY_DIM, direct_features
from headstart.cache.features import FeatureCache
from headstart.runtime.engines import OnnxEngine
from headstart.vision.preprocess import load_for_model


def test_onnx_engine_matches_torch(frozen, photos):
    engine = frozen.engine("cpu")
    assert isinstance(engine, OnnxEngine)
    torch_model = frozen.build_torch()
    real = np.stack([load_for_model(p, frozen.spec.preprocess) for p in photos[:5]])
    noise = torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(7)).numpy()
    for batch in (real, noise, real[:1]):  # batch sizes other than the export's: the batch axis is dynamic
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(batch)).numpy()
        got = engine(batch)
        assert got.shape == expected.shape == (len(batch), TINY_DIM)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


def test_a_failed_export_falls_back_to_float32_torch(frozen, photos, tiny_cache, monkeypatch, caplog):
    shutil.rmtree(tiny_cache / "onnx")  # nothing exported yet

    def refuse(*args, **kwargs):
        raise RuntimeError("ONNX export differs from torch by 5.36e+00 (> 0.001)")

    monkeypatch.setattr("headstart.runtime.frozen.export_onnx", refuse)
    with caplog.at_level("WARNING", logger="headstart.runtime.frozen"):
        engine = frozen.engine("cpu")
    assert not isinstance(engine, OnnxEngine) and "PyTorch instead of ONNX Runtime" in caplog.text
    batch = np.stack([load_for_model(p, frozen.spec.preprocess) for p in photos[:4]])
    got = engine(batch)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, direct_features(frozen, photos[:4]), atol=1e-5, rtol=0)  # no bfloat16


def test_a_failed_export_is_remembered_and_not_tried_again_until_the_toolchain_changes(frozen, tiny_cache,
                                                                                        monkeypatch, caplog):
    from headstart.runtime import export as export_module

    shutil.rmtree(tiny_cache / "onnx")
    tries = []

    def refuse(*args, **kwargs):
        tries.append(1)
        raise RuntimeError("ONNX export differs from torch by 5.36e+00 (> 0.001)")

    monkeypatch.setattr("headstart.runtime.frozen.export_onnx", refuse)
    with caplog.at_level("WARNING", logger="headstart.runtime.frozen"):
        engines = [frozen.engine("cpu") for _ in range(3)]  # stage 1, the refit, evaluate...: one export tried
    assert len(tries) == 1 and not any(isinstance(e, OnnxEngine) for e in engines)
    assert caplog.text.count("PyTorch instead of ONNX Runtime") == 3 and "5.36e+00" in caplog.records[-1].message
    assert frozen.engine_kind("cpu") == "torch-cpu-fp32"

    real = export_module._toolchain
    monkeypatch.setattr(export_module, "_toolchain", lambda: {**real(), "torch": "99.0"})  # an upgrade: try again
    assert frozen.engine_kind("cpu") == "onnxruntime-cpu-fp32"
    frozen.engine("cpu")
    assert len(tries) == 2


# --- the engine that computed the features is part of the key (issue 12) --------------------------------------


def test_cpu_onnx_features_keep_the_key_they_had_before_engines_were_told_apart(frozen):
    """ONNX Runtime's entries are not invalidated: their key is the one written before the engine was a part."""
    from headstart.paths import store_path

    before = dict(timm=frozen.spec.timm_name, w=frozen.weights_id, pre=frozen.spec.preprocess.to_dict())
    assert FeatureCache(frozen).dir == store_path("features", before)
    assert frozen.engine_kind("cpu") == "onnxruntime-cpu-fp32"
    assert frozen.cache_key("torch-cuda-bf16") != frozen.cache_key() != frozen.cache_key("torch-cpu-fp32")


class _DriftedTorchEngine:
    """Stands in for TorchEngine on CUDA (no GPU here): ONNX Runtime's features moved by 2%, as bfloat16's are."""

    def __init__(self, model, device: str) -> None:
        from headstart.runtime.engines import torch_kind

        self.kind = torch_kind(device)
        self.model = model

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(batch)).numpy() * 1.02


def test_features_from_a_cuda_engine_are_never_read_back_for_an_onnx_run(frozen, photos, monkeypatch):
    from headstart.cache.dataset import path_features
    from headstart.progress import NoProgress
    from headstart.runtime import frozen as frozen_module

    labels, splits = np.zeros(len(photos), np.int64), np.array(["train"] * len(photos))
    exact = direct_features(frozen, photos)
    with monkeypatch.context() as mp:
        mp.setattr(frozen_module, "pick_device", lambda requested="auto": "cuda")
        mp.setattr(frozen_module, "TorchEngine", _DriftedTorchEngine)
        on_gpu = path_features(photos, labels, splits, frozen, "auto", NoProgress(), "features")
    assert on_gpu.cached == 0
    np.testing.assert_allclose(on_gpu.features, exact * 1.02, atol=1e-3, rtol=0)

    on_cpu = path_features(photos, labels, splits, frozen, "cpu", NoProgress(), "features")
    assert on_cpu.cached == 0  # the GPU's entries are not this engine's
    np.testing.assert_allclose(on_cpu.features, exact, atol=1e-3, rtol=0)
    again = path_features(photos, labels, splits, frozen, "cpu", NoProgress(), "features")
    assert again.cached == len(photos)

    with monkeypatch.context() as mp:  # and the GPU's entries are still its own
        mp.setattr(frozen_module, "pick_device", lambda requested="auto": "cuda")
        mp.setattr(frozen_module, "TorchEngine", _DriftedTorchEngine)
        back_on_gpu = path_features(photos, labels, splits, frozen, "auto", NoProgress(), "features")
    assert back_on_gpu.cached == len(photos)
    np.testing.assert_array_equal(back_on_gpu.features, on_gpu.features)


def test_features_of_the_torch_fallback_are_kept_apart_from_onnx_ones(frozen, photos, tiny_cache, monkeypatch):
    """A failed export falls back to float32 torch: its features go under that engine's key, found there by
    the next run (the failure is remembered, so that run knows its engine before making it)."""
    import shutil

    from headstart.runtime.export import onnx_path_for

    export = onnx_path_for(frozen.spec, frozen.weights_id)
    good = export.read_bytes()
    shutil.rmtree(tiny_cache / "onnx")

    def refuse(*args, **kwargs):
        raise RuntimeError("ONNX export differs from torch by 5.36e+00 (> 0.001)")

    monkeypatch.setattr("headstart.runtime.frozen.export_onnx", refuse)
    cache = FeatureCache(frozen)
    assert cache.engine_kind == "onnxruntime-cpu-fp32"  # nothing tried yet
    got = cache.features_for(photos, lambda: frozen.engine("cpu"))
    assert cache.engine_kind == "torch-cpu-fp32" and got.hits == 0
    np.testing.assert_allclose(got.features, direct_features(frozen, photos), atol=1e-5, rtol=0)
    assert FeatureCache(frozen).engine_kind == "torch-cpu-fp32"  # the next run knows, before any engine
    assert FeatureCache(frozen).features_for(photos, lambda: frozen.engine("cpu")).hits == len(photos)

    export.parent.mkdir(parents=True, exist_ok=True)
    export.write_bytes(good)  # an export that works (another toolchain, say): ONNX Runtime's own entries
    onnx_cache = FeatureCache(frozen)
    assert onnx_cache.engine_kind == "onnxruntime-cpu-fp32"
    assert onnx_cache.features_for(photos, lambda: frozen.engine("cpu")).hits == 0
