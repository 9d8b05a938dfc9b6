"""model.onnx for a model trained on int8 features: the very int8 backbone graphs its head was trained and
calibrated on (`runtime.quantize`, cached), joined with the input normalisation, the head and the softmax.

Exporting the float backbone instead gave another model: on hymenoptera, trained with the int8 engine `auto` picks
on a VNNI CPU, the float32 export labelled 9 of 153 validation photos differently from the model it came from, and
its ECE moved from 0.0285 to 0.0381. One model, one answer: `predict`, `evaluate` and `serve` switch to model.onnx
once it exists, so it must compute what the model computes.

The graph is built with onnx's helpers rather than traced: the backbone's quantized nodes are reused as they are
(names prefixed per view), and the ops around them are the float32 ops, in the same order, that
`vision.preprocess.normalize` and `heads.config.head_proba` run in numpy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.heads.config import HeadConfig
from headstart.runtime.engines import Engine, OnnxEngine, ViewsEngine
from headstart.runtime.frozen import FrozenBackbone
from headstart.runtime.quantize import INT8_PREFIX
from headstart.serve import artifact
from headstart.serve.onnx_predictor import View
from headstart.vision.preprocess import PreprocessConfig, eval_views

log = logging.getLogger(__name__)


def int8_engine(record: artifact.ModelRecord, model_dir: Path) -> Engine | None:
    """The cached int8 engine a model trained with the int8 engine computes its features with; None where this
    cache cannot give it (no calibration and no photos to make one): the caller exports float32 and says so."""
    frozen = FrozenBackbone(record.backbone, Path(model_dir) / artifact.WEIGHTS_FILE, record.backbone_weights_id,
                            weights_prefix="backbone.").with_engine("int8", device="cpu")
    engine = frozen.engine("cpu")
    if not str(getattr(engine, "kind", "")).startswith(INT8_PREFIX):
        return None
    return engine if isinstance(engine, (OnnxEngine, ViewsEngine)) else None


def graph_paths(engine: Engine) -> tuple[Path, ...]:
    """The graphs of an int8 engine, one per view: the fixed-size one, and the any-size twin of a native view."""
    return (engine.fixed.path, engine.any_size.path) if isinstance(engine, ViewsEngine) else (engine.path,)


def engine_features(engine: Engine, images: list[Image.Image], pre: PreprocessConfig) -> np.ndarray:
    """The features of `images` as the feature cache computes them with `engine` (`vision.preprocess.eval_views`,
    each view through ONNX Runtime, concatenated): what an int8 export is checked against."""
    return np.concatenate([np.concatenate([engine(view[None]) for view in eval_views(im, pre)], 1)
                           for im in images])


def compose(graphs: tuple[Path, ...], views: tuple[View, ...], pre: PreprocessConfig, head: HeadConfig,
            head_state: dict[str, np.ndarray], target: Path) -> None:
    """Write at `target` the classifier whose view `views[i]` (uint8 N x H x W x 3) runs through `graphs[i]`:
    normalise, backbone, pooled features concatenated, standardise, linear layers with ReLU between, softmax of
    the logits over the temperature."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx import compose as onnx_compose

    nodes, inits, inputs, feats = [], [], [], []
    consts = {"inv255": np.array(1.0 / 255.0, np.float32), "mean": np.asarray(pre.mean, np.float32),
              "std": np.asarray(pre.std, np.float32)}
    inits += [numpy_helper.from_array(v, f"pre/{k}") for k, v in consts.items()]
    opsets = None
    for n, (path, view) in enumerate(zip(graphs, views)):
        backbone = onnx.load(str(path))
        opsets = opsets or backbone.opset_import
        inner = onnx_compose.add_prefix(backbone, f"v{n}/")
        size = view.size if n == 0 else None  # the native view's size follows each photo
        inputs.append(helper.make_tensor_value_info(view.name, TensorProto.UINT8, ["batch", size or f"h{n}",
                                                                                   size or f"w{n}", 3]))
        x = inner.graph.input[0].name
        nodes += [
            helper.make_node("Cast", [view.name], [f"v{n}/f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"v{n}/f", "pre/inv255"], [f"v{n}/unit"]),
            helper.make_node("Sub", [f"v{n}/unit", "pre/mean"], [f"v{n}/centred"]),
            helper.make_node("Div", [f"v{n}/centred", "pre/std"], [f"v{n}/nhwc"]),
            helper.make_node("Transpose", [f"v{n}/nhwc"], [x], perm=[0, 3, 1, 2]),
            *inner.graph.node,
        ]
        inits += list(inner.graph.initializer)
        feats.append(inner.graph.output[0].name)
    nodes.append(helper.make_node("Concat", feats, ["features"], axis=1) if len(feats) > 1
                 else helper.make_node("Identity", feats, ["features"]))
    head_nodes, head_inits = _head(head, head_state)
    graph = helper.make_graph(nodes + head_nodes, "headstart_int8", inputs,
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                             ["batch", head.n_classes])],
                              initializer=inits + head_inits)
    model = helper.make_model(graph, opset_imports=list(opsets))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def _head(cfg: HeadConfig, state: dict[str, np.ndarray]) -> tuple[list, list]:
    """`heads.config.head_proba` as ONNX nodes: (features - mean) / std, the layers, softmax(logits / T) (a
    multi-label head: each logit's sigmoid)."""
    from onnx import helper, numpy_helper

    ids = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    inits = [numpy_helper.from_array(np.asarray(state["mean"], np.float32), "head/mean"),
             numpy_helper.from_array(np.asarray(state["std"], np.float32), "head/std")]
    nodes = [helper.make_node("Sub", ["features", "head/mean"], ["head/centred"]),
             helper.make_node("Div", ["head/centred", "head/std"], ["head/x0"])]
    x = "head/x0"
    for n, i in enumerate(ids):
        inits += [numpy_helper.from_array(np.asarray(state[f"layers.{i}.weight"], np.float32).T.copy(),
                                          f"head/w{i}"),
                  numpy_helper.from_array(np.asarray(state[f"layers.{i}.bias"], np.float32), f"head/b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"head/w{i}"], [f"head/mm{i}"]),
                  helper.make_node("Add", [f"head/mm{i}", f"head/b{i}"], [f"head/z{i}"])]
        x = f"head/z{i}"
        if n < len(ids) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"head/r{i}"]))
            x = f"head/r{i}"
    if cfg.multi_label:  # independent labels: each one's sigmoid, no temperature (`heads.config.head_proba`)
        nodes.append(helper.make_node("Sigmoid", [x], ["probabilities"]))
        return nodes, inits
    if cfg.temperature != 1.0:
        inits.append(numpy_helper.from_array(np.array(cfg.temperature, np.float32), "head/temperature"))
        nodes.append(helper.make_node("Div", [x, "head/temperature"], ["head/scaled"]))
        x = "head/scaled"
    nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
    return nodes, inits
