"""The int8 graph's re-quantized weights (runtime.int8_weights): full 8 bits that AVX2's pairwise int16 sums
cannot saturate, the top-resolution convolutions left float, and the bias correction, on the tiny backbone."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_models import TINY_BACKBONE

from headstart.backbones.registry import resolve
from headstart.runtime import int8_weights, quantize

INT16_MAX = 32767


def _weights(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, shape)
    w.reshape(len(w), -1)[:, 3] *= 20  # one outlier weight per output channel, as BatchNorm folding makes them
    return w


def _quantized(w: np.ndarray, depthwise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    scale = int8_weights._scales(w, depthwise)
    return np.round(w / scale.reshape(-1, 1, 1, 1)).astype(np.int64), scale


def test_pointwise_weights_pair_within_int16_and_finer_than_seven_bits() -> None:
    w = _weights((16, 33, 1, 1))  # an odd input count: the last channel pairs with the kernel's zero padding
    q, scale = _quantized(w)
    padded = np.pad(np.abs(q).reshape(16, -1), ((0, 0), (0, 1)))
    pairs = padded[:, 0::2] + padded[:, 1::2]
    assert (255 * pairs).max() <= INT16_MAX  # uint8 activations of 255 against the pair: no saturation
    assert pairs.max(1).min() >= 126  # and the channel's range is used
    assert (scale < np.abs(w).reshape(16, -1).max(1) / 64).all()  # finer than ONNX Runtime's 7-bit weights
    assert np.abs(q).max() <= 127


def test_larger_kernels_bound_any_two_weights_and_depthwise_take_all_of_int8() -> None:
    w = _weights((8, 4, 3, 3), seed=1)
    q, _ = _quantized(w)
    top = np.sort(np.abs(q).reshape(8, -1), 1)
    assert (255 * (top[:, -1] + top[:, -2])).max() <= INT16_MAX  # whichever two the kernel pairs
    dw = _weights((8, 1, 3, 3), seed=2)
    qd, sd = _quantized(dw, depthwise=True)
    assert (np.abs(qd).reshape(8, -1).max(1) == 127).all()
    np.testing.assert_allclose(qd * sd.reshape(-1, 1, 1, 1), dw, atol=sd.max() / 2 + 1e-12)


@pytest.fixture
def tiny_graph(tiny_onnx: tuple[Path, Path], tmp_path: Path) -> Path:
    root, rel = tiny_onnx
    return Path(shutil.copy2(root / rel, tmp_path / "tiny.onnx"))


def test_the_top_resolution_stays_float(tiny_graph: Path) -> None:
    import onnx
    from onnx import shape_inference

    keep = int8_weights.float_weights(tiny_graph)
    graph = shape_inference.infer_shapes(onnx.load(str(tiny_graph))).graph
    sides = {v.name: v.type.tensor_type.shape.dim[-1].dim_value for v in [*graph.value_info, *graph.input]}
    side = sides[graph.input[0].name]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    stem = next(n for n in convs if n.input[0] == graph.input[0].name)
    assert stem.input[1] in keep
    assert {n.input[1] for n in convs if sides[n.input[0]] >= side / 2} == keep
    assert len(keep) < len(convs)  # the rest is quantized


def _calibrated(graph: Path, photos: list[Path], tmp: Path) -> tuple[Path, list[np.ndarray]]:
    from headstart.vision.preprocess import load_views

    pre = resolve(TINY_BACKBONE).preprocess
    views = [load_views(p, pre)[0] for p in photos[:64]]
    batches = [np.stack(views[i:i + 16]) for i in range(0, len(views), 16)]
    return quantize.calibrate(graph, batches, tmp / "calibration.json"), batches


def _run(graph: Path, batches: list[np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: b})[0] for b in batches])


def _folded_net(path: Path, size: int) -> Path:
    """A small stem / depthwise / pointwise network with BatchNorm statistics of its own, exported as headstart
    exports backbones: BatchNorm folds into the convolutions' biases, which the correction adjusts."""
    import torch
    from torch import nn

    from headstart.runtime.export import export_onnx

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
              nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
              nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for bn in (m for m in layers if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.bias.data.uniform_(-0.5, 0.5)
    return export_onnx(nn.Sequential(*layers), size, path)


def test_bias_correction_takes_back_the_mean_shift_of_rounded_weights(image_folder, tmp_path) -> None:
    photos = sorted(image_folder.rglob("*.jpg"))
    graph = _folded_net(tmp_path / "net.onnx", resolve(TINY_BACKBONE).preprocess.input_size)
    calibration, batches = _calibrated(graph, photos, tmp_path)
    corrected = quantize.quantize(graph, calibration, tmp_path / "corrected.onnx", keep_float=set())
    means = quantize.means_path(calibration)
    means.write_text("{}")  # the same recipe without the means: biases only re-scaled
    plain = quantize.quantize(graph, calibration, tmp_path / "plain.onnx", keep_float=set())
    ref = _run(graph, batches)
    shift_corrected = np.abs((_run(corrected, batches) - ref).mean(0)).mean()
    shift_plain = np.abs((_run(plain, batches) - ref).mean(0)).mean()
    assert shift_corrected < shift_plain, (shift_corrected, shift_plain)
