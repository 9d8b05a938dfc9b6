"""The int8 graph's weights, re-quantized after ONNX Runtime's quantizer: full 8-bit weights that AVX2 cannot
saturate, and biases corrected for what rounding the weights shifted.

ONNX Runtime quantizes weights per channel to 7 bits (`reduce_range`) on CPUs without VNNI, because AVX2's
u8 x s8 multiply-add (vpmaddubsw) sums two products into an int16 and saturates beyond 32767: two 8-bit weights
of 127 against two activations of 255 make 64770. Seven bits are safe but coarse. Measured on Lite0 (median
relative error of the pooled features against float32, 128 flowers photos, bench/engine.py prints the
accuracy): 7-bit weights 0.30; full 8-bit weights 0.32 with the real kernels (0.14 simulated: the rest is
saturation); the two re-quantizations below 0.13, equal in simulation and with the real kernels, then 0.10 with
the top resolution kept in float (`float_weights`) and 0.06 with the bias correction.

- Depthwise convolutions run through a kernel that widens to int32 before it adds: their weights take all of
  int8 (symmetric, per channel).
- Other convolutions: each output channel's scale is chosen so that any two weights that the kernel pairs sum to
  at most 127 in magnitude (255 x 128 < 32767). For a 1x1 convolution the pairs are neighbouring input channels
  (2j, 2j+1): the largest pair sets the scale, finer than 7 bits whenever the largest weights are not
  neighbours. Larger kernels bound the two largest weights of the channel instead, whatever the pairing.
- Bias correction (Nagel et al., "Data-Free Quantization", 2019): rounding the weights moves each output
  channel's mean by dW . E[x]; the float graph's mean input per channel, measured on the calibration photos,
  gives E[x], and the bias takes the shift back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PAIR_BOUND = 127  # two paired weights sum to at most this: 255 x (127 + 1 for rounding) < 32767


def float_weights(fp32: Path, min_fraction: float = 0.5) -> set[str]:
    """The weights of the convolutions that read a map at least `min_fraction` of the input's side: the stem and
    the first blocks, a tenth of Lite0's work and the part most sensitive to rounding (each of its layers, alone
    in int8, costs as much error as any five of the rest). Their convolutions stay float32."""
    import onnx
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(onnx.load(str(fp32))).graph
    sides = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
             for v in [*graph.value_info, *graph.input]}
    side = sides[graph.input[0].name][-1]
    keep = set()
    for node in graph.node:
        shape = sides.get(node.input[0], [])
        if node.op_type == "Conv" and len(shape) == 4 and shape[-1] >= min_fraction * side:
            keep.add(node.input[1])
    return keep


def input_means(fp32: Path, batches: list[np.ndarray]) -> dict[str, list[float]]:
    """The float graph's mean of each convolution's input, per channel, over `batches`."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    names = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type == "Conv"))  # in order, once each
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = session.get_inputs()[0].name
    sums: dict[str, np.ndarray] = {}
    count = 0
    for batch in batches:
        for name, out in zip(names, session.run(names, {pixels: np.ascontiguousarray(batch, np.float32)})):
            sums[name] = sums.get(name, 0) + out.astype(np.float64).mean((2, 3)).sum(0)
        count += len(batch)
    return {name: (s / count).tolist() for name, s in sums.items()}


def requantize(quantized: Path, fp32: Path, means: dict[str, list[float]], target: Path) -> None:
    """Rewrite the weights and biases of `quantized` (QDQ, from `fp32`) as the module docstring says."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(quantized))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    source_graph = onnx.load(str(fp32)).graph
    floats = {node.name: node for node in source_graph.node if node.op_type == "Conv"}
    values = {i.name: numpy_helper.to_array(i) for i in source_graph.initializer}

    def get(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def put(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    for node in graph.node:
        if node.op_type != "Conv" or node.name not in floats:
            continue
        w_dq, x_dq = producer.get(node.input[1]), producer.get(node.input[0])
        if not _dequantizes(w_dq) or not _dequantizes(x_dq):
            continue  # a convolution left in float32
        source = floats[node.name]
        w = values[source.input[1]].astype(np.float64)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        scale = _scales(w, depthwise=group > 1 and group == w.shape[0])
        q = np.clip(np.round(w / scale.reshape(-1, 1, 1, 1)), -127, 127)
        put(w_dq.input[0], q.astype(np.int8))
        put(w_dq.input[1], scale.astype(np.float32))
        if len(node.input) > 2 and len(source.input) > 2:  # the bias follows the weights' new scale
            bias = values[source.input[2]].astype(np.float64)
            if source.input[0] in means:
                bias = bias - _mean_shift(q * scale.reshape(-1, 1, 1, 1) - w, np.asarray(means[source.input[0]]),
                                          group)
            b_dq = producer[node.input[2]]
            b_scale = get(x_dq.input[1]).astype(np.float64) * scale
            put(b_dq.input[0], np.clip(np.round(bias / b_scale), -2**31, 2**31 - 1).astype(np.int32))
            put(b_dq.input[1], b_scale.astype(np.float32))
    onnx.save(model, str(target))


def _mean_shift(shift: np.ndarray, mean: np.ndarray, group: int) -> np.ndarray:
    """How far each output channel's mean moves when its weights move by `shift`, for inputs of this mean per
    channel (each output channel of a grouped convolution reads its group's inputs)."""
    out = len(shift)
    inputs = mean.reshape(group, -1)[np.arange(out) // (out // group)]
    return (shift.sum((2, 3)) * inputs).sum(1)


def _dequantizes(node) -> bool:
    return node is not None and node.op_type == "DequantizeLinear"


def _scales(w: np.ndarray, depthwise: bool) -> np.ndarray:
    """Per output channel: the scale of symmetric int8 weights for the kernel that will multiply them."""
    flat = np.abs(w.reshape(len(w), -1))
    if depthwise:
        return np.maximum(flat.max(1), 1e-12) / 127
    if w.shape[2:] == (1, 1):
        padded = np.pad(flat, ((0, 0), (0, flat.shape[1] % 2)))
        bound = (padded[:, 0::2] + padded[:, 1::2]).max(1)
    else:
        top = np.sort(flat, 1)
        bound = top[:, -1] + (top[:, -2] if top.shape[1] > 1 else 0)
    return np.maximum(bound, 1e-12) / PAIR_BOUND
