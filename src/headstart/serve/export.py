"""The whole classifier as one ONNX graph: 8-bit RGB pixels in, class probabilities out.

The graph holds the input normalisation, the backbone with its multi-scale pooling (run once more on the native
view where the model has one; averaged over the photo's orientations where the model has several), the head with
its standardisation, and the softmax; its metadata holds the class names, the resize-and-crop recipe of each input
and the headstart version (`onnx_predictor.EXPORT_KEY`), so the file alone is enough for any ONNX Runtime user.
An export is written only after it agrees with the PyTorch model on real or generated images;
`export_quantize.quantize_int8` replaces it with a statically quantized copy only when the accuracy on validation
photos holds.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from headstart import __version__
from headstart.backbones.pooled import PooledFeatures
from headstart.backbones.weights import create_model
from headstart.data.imageio import ImageDecodeError, load_rgb
from headstart.data.scan import scan_folder
from headstart.errors import ArtifactError
from headstart.heads.config import HeadConfig, head_proba
from headstart.paths import atomic_path, file_sha256
from headstart.runtime.engines import Engine, OrientedEngine
from headstart.serve import artifact
from headstart.serve.onnx_predictor import EXPORT_FILE, EXPORT_FORMAT, EXPORT_KEY, OnnxPredictor, View
from headstart.vision.preprocess import ORIENTATIONS, PreprocessConfig, normalize, resize_and_crop

log = logging.getLogger(__name__)

PARITY_TOL = 1e-3  # max |Δprob| allowed between the exported graph and PyTorch
PARITY_IMAGES = 32  # images the parity check runs on


@dataclass(frozen=True)
class Parity:
    """How the export agreed with PyTorch."""

    n_images: int
    source: str  # "validation photos" or "generated images"
    max_dprob: float
    top1_agreement: float


@dataclass(frozen=True)
class Int8Report:
    """The int8 decision: float and int8 side by side on the validation photos."""

    accepted: bool
    reason: str
    n_val: int
    n_calibration: int
    float_accuracy: float
    int8_accuracy: float
    float_bytes: int
    int8_bytes: int
    float_images_per_s: float
    int8_images_per_s: float
    max_drop_points: float


@dataclass(frozen=True)
class ExportReport:
    path: Path
    bytes: int
    parity: Parity
    int8: Int8Report | None = None
    quantization: str = "float32"  # what model.onnx computes: "float32", or "int8" for a model trained with it
    note: str = ""  # a difference between the export and the model the user should know of


class _Classifier(nn.Module):
    """uint8 NHWC views -> probabilities: normalise, pooled features per view (each averaged over the view's
    orientations where the model has several, `runtime.engines.OrientedEngine`; the views concatenated), head,
    softmax of the logits over the head's stored temperature (what `heads.config.head_proba` computes)."""

    def __init__(self, features: PooledFeatures, head: nn.Module, cfg: PreprocessConfig,
                 temperature: float = 1.0, multi_label: bool = False) -> None:
        super().__init__()
        self.features, self.head = features, head
        self.temperature = float(temperature)  # a constant of the graph
        self.multi_label = multi_label  # each label's sigmoid instead of the softmax (`heads.config.head_proba`)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.orientations = tuple(ORIENTATIONS.values())[:cfg.orientations]

    def _pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        # The same float32 operations, in the same order, as vision.preprocess.normalize.
        x = (pixels.permute(0, 3, 1, 2).float() * (1.0 / 255.0) - self.mean) / self.std
        if len(self.orientations) == 1:
            return self.features(x)
        return torch.stack([self.features(_oriented(x, *how)) for how in self.orientations]).mean(0)

    def forward(self, pixels: torch.Tensor, native: torch.Tensor | None = None) -> torch.Tensor:
        feats = self._pooled(pixels)
        if native is not None:
            feats = torch.cat([feats, self._pooled(native)], 1)
        logits = self.head(feats)
        if self.multi_label:
            return torch.sigmoid(logits)
        return torch.softmax(logits / self.temperature if self.temperature != 1.0 else logits, 1)


def _oriented(x: torch.Tensor, transposed: bool, upside_down: bool, mirrored: bool) -> torch.Tensor:
    """`vision.preprocess.oriented` in torch, for the graph: NCHW turned or mirrored."""
    x = x.transpose(2, 3) if transposed else x
    x = torch.flip(x, [2]) if upside_down else x
    return torch.flip(x, [3]) if mirrored else x


def views_of(cfg: PreprocessConfig) -> tuple[View, ...]:
    """The graph's inputs: the standard centre crop, and the native view (the whole image at about its own
    resolution, `vision.preprocess.eval_views`) where the model has one."""
    views = [View("pixels", cfg.input_size, cfg.resize_size, cfg.interpolation, cfg.crop_pct)]
    if cfg.native_size:
        views.append(View("pixels_native", cfg.native_size, cfg.native_size, cfg.interpolation, 1.0))
    return tuple(views)


def export_model(model_dir: str | Path, data: str | Path | None = None, target: Path | None = None) -> ExportReport:
    """Write `model_dir/model.onnx` (or `target`) and check it against PyTorch on the validation photos of `data`
    (the training folder) when given, else on generated images; a mismatch raises and leaves no file."""
    model_dir = Path(model_dir)
    art = artifact.load(model_dir, with_backbone=False)
    record = art.record
    pre = record.backbone.preprocess
    if pre.orientations > 1 and (pre.native_size or record.params.get("engine") == "int8"):  # nothing is written
        raise ArtifactError(f"{model_dir} averages each photo over its {pre.orientations} orientations "
                            f"{'beside a native view' if pre.native_size else 'on int8 features'}, which export "
                            "cannot write into one ONNX graph yet; predict and serve run it as it is")
    if record.companion is not None:
        raise ArtifactError(f"{model_dir} joins the features of {record.backbone.name} and {record.companion.name}, "
                            "which export cannot write into one ONNX graph yet; predict and serve run it as it is")
    target = Path(target) if target else model_dir / EXPORT_FILE
    images, source = parity_images(record, data)
    note = ""
    if record.params.get("engine") == "int8":  # the head was trained on int8 features: export those
        from headstart.serve.export_int8 import int8_engine

        engine = int8_engine(record, model_dir)
        if engine is not None:
            return _export_int8(model_dir, art, engine, images, source, target)
        note = ("the model was trained on int8 features, but this cache holds no int8 calibration for its backbone: "
                "model.onnx is float32, and its probabilities differ a little from the model's")
    features = PooledFeatures(create_model(record.backbone, model_dir / artifact.WEIGHTS_FILE, prefix="backbone."))
    model = _Classifier(features.eval(), _head_module(art), record.backbone.preprocess,
                        record.head.temperature, record.head.multi_label).eval()
    views = views_of(record.backbone.preprocess)
    with atomic_path(target) as tmp:
        _export_graph(model, views, tmp)
        write_metadata(tmp, record, views, file_sha256(model_dir / artifact.WEIGHTS_FILE), "float32")
        parity = _refuse_disagreement(check_parity(tmp, features, art, images, source), "the ONNX export",
                                      "PyTorch")
    log.info("exported %s (max |Δprob| %.1e on %d %s)", target, parity.max_dprob, parity.n_images, source)
    return ExportReport(target, target.stat().st_size, parity, note=note)


def compared(got: np.ndarray, ref: np.ndarray, n: int, source: str, head: HeadConfig | None = None) -> Parity:
    """How the export's probabilities `got` agree with the model's `ref`: the largest difference, and the share of
    decisions that agree where rounding cannot flip them (the top class; a multi-label head's on/off per label)."""
    if head is not None and head.multi_label:
        cuts = np.asarray(head.thresholds, np.float32)
        decided = np.abs(ref - cuts) > 2 * PARITY_TOL  # not within rounding of a threshold
        same = (got >= cuts) == (ref >= cuts)
        return Parity(n, source, float(np.abs(got - ref).max()), float(same[decided].mean()) if decided.any() else 1.0)
    top = np.sort(ref, 1)
    decided = top[:, -1] - top[:, -2] > 2 * PARITY_TOL  # near-ties may flip by rounding alone
    agree = float((got.argmax(1) == ref.argmax(1))[decided].mean()) if decided.any() else 1.0
    return Parity(n, source, float(np.abs(got - ref).max()), agree)


def _refuse_disagreement(parity: Parity, what: str, against: str) -> Parity:
    """`parity`, or the one-line refusal of an export that disagrees with `against` (raised inside the atomic
    write, so that nothing is written)."""
    if parity.max_dprob > PARITY_TOL or parity.top1_agreement < 1.0:
        raise ArtifactError(
            f"{what} disagrees with {against} on {parity.n_images} {parity.source} (max |Δprob| "
            f"{parity.max_dprob:.1e}, allowed {PARITY_TOL:.0e}; top-1 agreement {parity.top1_agreement:.1%}); "
            "nothing was written: report this with the model's backbone")
    return parity


def _export_int8(model_dir: Path, art: artifact.Artifact, engine: Engine, images: list[Image.Image],
                 source: str, target: Path) -> ExportReport:
    """model.onnx from the int8 graphs the model's features come from (`export_int8`), checked against the
    model as `predict` runs it without an export: the cached int8 engine and the numpy head."""
    from headstart.serve.export_int8 import compose, engine_features, graph_paths

    record, pre = art.record, art.record.backbone.preprocess
    views = views_of(pre)
    with atomic_path(target) as tmp:
        compose(graph_paths(engine), views, pre, record.head, art.head_state, tmp)
        write_metadata(tmp, record, views, file_sha256(model_dir / artifact.WEIGHTS_FILE),
                       "int8 (the engine the model was trained with)")
        ref = head_proba(record.head, art.head_state, engine_features(engine, images, pre))
        parity = _refuse_disagreement(
            compared(OnnxPredictor(tmp).proba_images(images), ref, len(images), source, record.head),
            "the int8 ONNX export", "the model")
    log.info("exported %s, int8 (max |Δprob| %.1e on %d %s)", target, parity.max_dprob, parity.n_images, source)
    return ExportReport(target, target.stat().st_size, parity, quantization="int8")


def _head_module(art: artifact.Artifact) -> nn.Module:
    from headstart.heads.module import Head

    head = Head(art.record.head)
    head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in art.head_state.items()})
    return head.eval()


def _export_graph(model: nn.Module, views: tuple[View, ...], path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    examples = tuple(torch.randint(0, 256, (2, v.size, v.size, 3), dtype=torch.uint8, generator=gen) for v in views)
    batch = torch.export.Dim("batch")
    # The exporter prints its own progress; the library never prints.
    with contextlib.redirect_stdout(io.StringIO()), quiet("onnx_ir", "onnxscript", "torch.onnx"):
        program = torch.onnx.export(
            model, examples, dynamo=True, input_names=[v.name for v in views], output_names=["probabilities"],
            dynamic_shapes=tuple({0: batch} for _ in views), verbose=False,
        )
    program.save(str(path))


def write_metadata(path: Path, record: artifact.ModelRecord, views: tuple[View, ...], weights_sha: str,
                    quantization: str) -> None:
    import onnx

    graph = onnx.load(str(path))
    pre = record.backbone.preprocess
    meta = {
        "format": EXPORT_FORMAT, "format_version": 1, "headstart_version": __version__,
        "classes": list(record.classes), "backbone": record.backbone.name, "quantization": quantization,
        "inputs": [v.to_dict() for v in views],
        "input_layout": "uint8 RGB, N x H x W x 3: resize the short side to 'resize', centre-crop 'size' x 'size'",
        "normalization": {"mean": list(pre.mean), "std": list(pre.std), "in_graph": True},
        "output": "probabilities, N x len(classes)",
        "weights_sha256": weights_sha, "model_created": record.created,
        "metrics": _val_metrics(record),
    }
    if record.head.multi_label:  # independent labels: each is on at or above its own threshold
        meta.update({"multi_label": True, "thresholds": list(record.head.thresholds),
                     "output": "probabilities, N x len(classes): each label's sigmoid; a label is on at or above "
                               "its entry of 'thresholds'"})
    del graph.metadata_props[:]
    for key, value in ((EXPORT_KEY, json.dumps(meta)), ("classes", json.dumps(list(record.classes))),
                       ("headstart_version", __version__)):
        graph.metadata_props.add(key=key, value=value)
    graph.doc_string = f"headstart {__version__} image classifier: {', '.join(record.classes)}"
    onnx.save(graph, str(path))


def _val_metrics(record: artifact.ModelRecord) -> dict:
    ml = record.fit.multilabel if record.fit else None
    if ml is not None and ml.val is not None:
        return {"val_map": ml.val.map, "val_micro_f1": ml.val.micro_f1, "val_macro_f1": ml.val.macro_f1,
                "val_n": ml.val.n}
    ev = record.fit.val_metrics if record.fit else None
    return {"val_accuracy": ev.accuracy, "val_n": ev.n} if ev is not None else {}


# --- checks ------------------------------------------------------------------------------------------------------

def parity_images(record: artifact.ModelRecord, data: str | Path | None,
                  n: int = PARITY_IMAGES) -> tuple[list[Image.Image], str]:
    """Decoded images to check an export on: the validation split of `data` as training made it, else seeded
    generated ones of several sizes and aspect ratios (smooth gradients and noise, so both views see detail)."""
    if data is not None:
        paths = spread(validation_paths(record, data), n)
        images = []
        for p in paths:
            try:
                images.append(load_rgb(p, record.backbone.preprocess.resize_size))
            except ImageDecodeError:
                continue
        if images:
            return images, "validation photos"
    rng = np.random.default_rng(0)
    out = []
    for i in range(min(n, 12)):
        w, h = int(rng.integers(96, 400)), int(rng.integers(96, 400))
        yy, xx = np.mgrid[:h, :w]
        base = np.stack([(xx * (i + 1)) % 256, (yy * 3) % 256, ((xx + yy) * 2) % 256], -1).astype(np.float32)
        arr = np.clip(base * rng.uniform(0.3, 1.0) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out, "generated images"


def validation_paths(record: artifact.ModelRecord, data: str | Path) -> list[Path]:
    """The validation photos of the training folder `data`, split as training split it (same fraction and seed)."""
    val_split = float(record.params.get("val_split", 0.2) or 0.0)
    if record.head.multi_label:
        from headstart.data.multilabel import read_multilabel

        data_ml = read_multilabel(data, val_split, float(record.params.get("test_split", 0.0) or 0.0),
                                  int(record.params.get("seed", 0)))
        return [p for p, split in zip(data_ml.paths, data_ml.splits) if split == "val"]
    dataset = scan_folder(data, val_split=val_split, test_split=float(record.params.get("test_split", 0.0) or 0.0),
                          seed=int(record.params.get("seed", 0)))
    return dataset.paths("val")


def spread(paths: list[Path], n: int) -> list[Path]:
    """At most n of `paths`, evenly spaced (the paths are grouped by class: every class gets its share)."""
    if len(paths) <= n:
        return list(paths)
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, n)]


def check_parity(path: Path, features: PooledFeatures, art: artifact.Artifact, images: list[Image.Image],
                 source: str) -> Parity:
    """Probabilities from the exported file against PyTorch's features with the saved head's numpy forward (what
    the cached-graph predictor computes) on the same decoded images."""
    cfg = art.record.backbone.preprocess
    onnx_proba = OnnxPredictor(path).proba_images(images)
    views = [cfg] + ([replace(cfg, input_size=cfg.native_size, crop_pct=1.0)] if cfg.native_size else [])
    # each view's features averaged over the model's orientations, by the engine that averages them when predicting
    pooled = OrientedEngine(lambda batch: features(torch.from_numpy(batch)).numpy(), cfg.orientations)
    with torch.no_grad():
        feats = np.concatenate([pooled(np.stack([normalize(resize_and_crop(im, v), v) for im in images]))
                                for v in views], 1)
    return compared(onnx_proba, head_proba(art.record.head, art.head_state, feats), len(images), source,
                    art.record.head)


@contextlib.contextmanager
def quiet(*names: str, level: int = logging.WARNING):
    """These loggers at `level` or above (the root logger: "") inside the block."""
    loggers = [logging.getLogger(n or None) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
