"""`headstart export --quantize int8`: the float export statically quantized with ONNX Runtime (QDQ, per-channel
int8 weights), calibrated on training photos, and kept only when the accuracy on validation photos holds."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from headstart.data.scan import scan_folder
from headstart.errors import ConfigError, DataError
from headstart.paths import atomic_path
from headstart.serve import artifact
from headstart.serve.export import Int8Report, quiet, spread, validation_paths
from headstart.serve.onnx_predictor import EXPORT_FILE, EXPORT_KEY, OnnxPredictor

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 128  # training photos int8 calibration sees (more moved accuracy by nothing, cost minutes)
INT8_MAX_DROP = 1.0  # accuracy points int8 may lose on the validation photos before the float model is kept


def quantize_int8(model_dir: str | Path, data: str | Path, max_drop: float = INT8_MAX_DROP,
                  val: str | Path | None = None, float_path: Path | None = None,
                  target: Path | None = None) -> Int8Report:
    """Statically quantize the float export (QDQ, per-channel int8 weights) calibrated on training photos of
    `data`. The int8 file replaces `target` (default: the float export itself) only when accuracy on the
    validation photos (`val`, else the validation split of `data`) drops by at most `max_drop` points; else the
    report says why and nothing changes."""
    model_dir = Path(model_dir)
    float_path = Path(float_path) if float_path else model_dir / EXPORT_FILE
    target = Path(target) if target else float_path
    record = artifact.load(model_dir).record
    if record.head.multi_label:
        raise ConfigError("--quantize int8 is not available for multi-label models yet (its check is single-label "
                          "accuracy); export in float32")
    calib = _calibration_paths(record, data)  # before any work: a folder without photos costs nothing
    val_folder = Path(val) if val else None
    if val_folder is None and not validation_paths(record, data):
        raise DataError(f"{data}: no validation photos to check int8 against; pass --val FOLDER")
    float_bytes = float_path.stat().st_size
    float_acc, float_ips, n_val = _accuracy(float_path, val_folder, record, data)
    try:
        with atomic_path(target) as tmp:
            _quantize(float_path, tmp, calib)
            int8_acc, int8_ips, _ = _accuracy(tmp, val_folder, record, data)
            drop = (float_acc - int8_acc) * 100
            report = Int8Report(
                drop <= max_drop, f"accuracy {float_acc:.2%} -> {int8_acc:.2%} ({-drop:+.1f} points; at most "
                f"-{max_drop:g} allowed)", n_val, len(calib), float_acc, int8_acc, float_bytes, tmp.stat().st_size,
                float_ips, int8_ips, max_drop)
            if not report.accepted:
                raise _Refused  # inside the block: the int8 file is discarded, the float one stays
    except _Refused:
        log.warning("int8 refused: %s; the float model is kept", report.reason)
    return report


class _Refused(Exception):
    """Leaves the atomic write so that the refused int8 file is removed."""


def _calibration_paths(record: artifact.ModelRecord, data: str | Path) -> list[Path]:
    val_split = float(record.params.get("val_split", 0.2) or 0.0)
    dataset = scan_folder(data, val_split=val_split, seed=int(record.params.get("seed", 0)))
    paths = spread(dataset.paths("train"), CALIBRATION_IMAGES)
    if not paths:
        raise DataError(f"{data}: no training photos to calibrate int8 on")
    return paths


def _accuracy(path: Path, val: Path | None, record: artifact.ModelRecord, data: str | Path
              ) -> tuple[float, float, int]:
    """(accuracy, images/s with decoding, images) of the export at `path` on the validation photos."""
    predictor = OnnxPredictor(path)
    t0 = time.perf_counter()
    if val is not None:
        ev, _ = predictor.evaluate(val)
        return ev.accuracy, ev.n / (time.perf_counter() - t0), ev.n
    paths = validation_paths(record, data)
    labels = [record.classes.index(p.parent.name) if p.parent.name in record.classes else -1 for p in paths]
    proba, ok = predictor.proba_paths(paths)
    secs = time.perf_counter() - t0
    y = np.array(labels)[ok]
    return float((proba.argmax(1) == y).mean()) if len(y) else 0.0, len(paths) / secs, int(len(y))


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over decoded training photos, a batch at a time."""

    def __init__(self, predictor: OnnxPredictor, paths: list[Path], batch: int = 16) -> None:
        self.predictor, self.paths, self.batch, self.start = predictor, paths, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        while self.start < len(self.paths):
            chunk = self.paths[self.start:self.start + self.batch]
            self.start += self.batch
            feeds = self.predictor.feeds_paths(chunk)
            if feeds is not None:
                return feeds
        return None

    def rewind(self) -> None:
        self.start = 0


def _quantize(src: Path, dst: Path, calibration: list[Path]) -> None:
    """QDQ static quantization of the convolutions, per channel, with 7-bit weights (`reduce_range`: without
    VNNI, ONNX Runtime's u8 x s8 products saturate 16-bit sums; on hymenoptera val full-range weights lost 3.9
    points, reduced 2.6). The stem convolution stays float: it sees the normalised pixels, whose int8 rounding
    cost another 2 points. The pooled features and the head stay float too: the concatenated stage outputs differ
    in scale by orders of magnitude, which one int8 scale cannot hold."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    source = onnx.load(str(src), load_external_data=False)
    meta = {p.key: p.value for p in source.metadata_props}
    stem = [next(n.name for n in source.graph.node if n.op_type == "Conv")]  # nodes are in topological order
    with quiet("", level=logging.ERROR):  # quantize_static logs advice and progress through the root logger
        quantize_static(
            str(src), str(dst), _Calibration(OnnxPredictor(src), calibration), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"], nodes_to_exclude=stem, reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    graph = onnx.load(str(dst))
    info = json.loads(meta[EXPORT_KEY])
    info["quantization"] = "int8 (static QDQ, per-channel, convolutions)"
    del graph.metadata_props[:]
    for key, value in {**meta, EXPORT_KEY: json.dumps(info)}.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(dst))
