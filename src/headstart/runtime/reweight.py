"""An export made from a cached export of the same network: its graph with another network's weights in it, at
another input size. `export.export_onnx` tries this before the dynamo exporter, and checks the result against
torch at every size exactly as it checks a fresh export.

Why: the dynamo exporter takes ~13 s for lite0 on this 2-core CPU, and a fine-tuning run on small photos needed it
twice (the pretrained backbone at the photos' size, then the tuned backbone), ~27 s of a ~280 s run. The graph is
the same each time; only the weights and the input size change. Swapping the weights takes ~1 s.

The exporter folds each BatchNorm into the convolution whose output it normalises (the convolution's initializers
`<conv>.weight` and `<conv>.weight_bias` then depend on both modules), so the values are folded the same way here;
any other initializer named after a parameter or buffer takes that tensor. A graph whose weights this cannot
account for disagrees with torch at the parity check, and is exported afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def conv_norm_pairs(model, size: int) -> dict[str, object]:
    """Each convolution's name -> the BatchNorm applied straight to its output (in eval mode: a fixed affine map
    the exporter folds away), found by running the model once on a `size` px input."""
    import torch
    from torch import nn

    names = {id(m): name for name, m in model.named_modules()}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is kept so that its id is not reused
    pairs: dict[str, object] = {}

    def conv_done(module, _inputs, out) -> None:
        outputs[id(out)] = (names[id(module)], out)

    def norm_starts(module, inputs) -> None:
        if id(inputs[0]) in outputs:
            pairs[outputs[id(inputs[0])][0]] = module

    hooks = [m.register_forward_hook(conv_done) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(norm_starts) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def graph_values(model, size: int) -> dict[str, np.ndarray]:
    """The initializer values a graph of `model` holds, by the exporter's names."""
    import torch

    with torch.no_grad():
        values = {name: t.detach().float().numpy() for name, t in model.state_dict().items() if t.is_floating_point()}
        convs = dict(model.named_modules())
        for name, norm in conv_norm_pairs(model, size).items():
            conv = convs[name]
            scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
            bias = norm.bias - norm.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            values[f"{name}.weight"] = (conv.weight * scale.reshape(-1, 1, 1, 1)).numpy()
            values[f"{name}.weight_bias"] = bias.numpy()
    return values


def reweighted(source: Path, values: dict[str, np.ndarray], size: int, target: Path,
               output_names: tuple[str, ...]) -> bool:
    """Write to `target` the graph at `source` (an any-size export) with the initializer `values` (`graph_values`)
    and a fixed `size` px input; False, writing nothing, when the graph's outputs or initializers do not match."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(source))
    if tuple(o.name for o in graph.graph.output) != tuple(output_names):
        return False
    nodes = [n for n in graph.graph.node if n.op_type == "Conv" and len(n.input) > 1]
    if any(len(n.input) < 3 and f"{n.input[1]}_bias" in values for n in nodes):
        return False  # the exporter dropped a folded bias that was zero (freshly initialised statistics)
    convs = {n.input[1] for n in nodes}
    replaced = 0
    for init in graph.graph.initializer:
        new = values.get(init.name)
        if new is None:
            if init.name in convs:  # a convolution weight this model does not name: another network
                return False
            continue
        old = numpy_helper.to_array(init)
        if old.shape != new.shape:
            return False
        init.CopyFrom(numpy_helper.from_array(new.astype(old.dtype), init.name))
        replaced += 1
    if not replaced:
        return False
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    for axis in (2, 3):
        dims[axis].Clear()
        dims[axis].dim_value = size
    onnx.save(graph, str(target))
    log.info("made %s from %s with new weights (%d tensors)", target.name, source.name, replaced)
    return True
