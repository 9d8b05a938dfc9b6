"""runtime.frozen: the frozen backbone's ONNX engine agrees with torch, and a failed export falls back to
float32 torch."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from conftest import TINY_DIM, _direct_features
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
    np.testing.assert_allclose(got, _direct_features(frozen, photos[:4]), atol=1e-5, rtol=0)  # no bfloat16


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
