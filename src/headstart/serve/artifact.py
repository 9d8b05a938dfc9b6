"""The saved model: a directory with `model.safetensors` (backbone + head tensors) and `headstart.json`, a
`ModelRecord` (everything needed to rebuild and use the model, and the run's `FitReport`). Loading validates both,
reads every format this project has written, refuses newer ones, and never unpickles anything.

Formats of headstart.json:
- 1: the run's record spread over the top level (params, train, history, counts, metrics, skipped, decision as
  a flat dict); models saved before the native view have no `native_size` in their preprocessing.
- 2: the run's record whole under "fit" (`FitReport.to_dict`), the settings under "params".
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headstart.backbones.registry import BackboneSpec
from headstart.errors import ArtifactError
from headstart.heads.config import HeadConfig
from headstart.paths import atomic_path, atomic_write_bytes
from headstart.records import FitReport
from headstart.vision.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

FORMAT = "headstart-model"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
META_FILE = "headstart.json"


@dataclass(frozen=True)
class ModelRecord:
    """What headstart.json holds, typed."""

    classes: tuple[str, ...]
    backbone: BackboneSpec
    backbone_weights_id: str  # fingerprint of the backbone tensors: keys the exported-engine cache
    head: HeadConfig
    params: dict[str, Any] = field(default_factory=dict)  # the ImageClassifier settings it was trained with
    fit: FitReport | None = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "classes": list(self.classes),
            "backbone": {**_spec_to_dict(self.backbone), "weights_id": self.backbone_weights_id},
            "head": self.head.to_dict(), "params": self.params, "fit": self.fit.to_dict() if self.fit else None,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": self.versions or _versions(),
        }

    @classmethod
    def from_dict(cls, meta: dict, where: Path) -> "ModelRecord":
        version = _validate(meta, where)
        try:
            head = HeadConfig.from_dict(meta["head"])
            weights_id = str(meta["backbone"]["weights_id"])
            fit = meta.get("fit") if version >= 2 else meta
            report = (FitReport.from_dict(fit) if version >= 2 else FitReport.from_v1(fit)) if fit else None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{where}: damaged record ({exc!r}); re-train the model") from None
        return cls(tuple(meta["classes"]), _spec_from_dict(meta["backbone"]), weights_id, head,
                   dict(meta.get("params") or {}), report, str(meta.get("created", "")), dict(meta.get("versions") or {}))


@dataclass(eq=False)
class Artifact:
    record: ModelRecord
    head_state: dict[str, np.ndarray]
    backbone_state: dict[str, np.ndarray] | None = None  # None when loaded lazily (predict reads it from disk)


def save(artifact: Artifact, out_dir: str | Path) -> Path:
    """Write weights then metadata, each atomically; metadata last, so a directory with a valid
    headstart.json always has its weights."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": _contiguous(v) for k, v in artifact.head_state.items()}
    tensors.update({f"backbone.{k}": _contiguous(v) for k, v in (artifact.backbone_state or {}).items()})
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    meta = artifact.record.to_dict()
    atomic_write_bytes(out / META_FILE, json.dumps(meta, indent=2, default=_jsonable).encode())
    return out


def load(model_dir: str | Path, with_backbone: bool = False) -> Artifact:
    d = Path(model_dir)
    meta_path, weights_path = d / META_FILE, d / WEIGHTS_FILE
    if not d.is_dir():
        raise ArtifactError(f"{d}: no such model directory; train one with `headstart train DATA --out {d}`")
    if not meta_path.exists() or not weights_path.exists():
        missing = META_FILE if not meta_path.exists() else WEIGHTS_FILE
        raise ArtifactError(f"{d}: not a headstart model (no {missing}); train one with `headstart train`")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{meta_path}: unreadable metadata ({exc.__class__.__name__}); re-train or restore it")
    record = ModelRecord.from_dict(meta, meta_path)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{weights_path}: corrupt weights file ({exc}); re-train or restore it") from None
    head_state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    backbone_state = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")} if with_backbone else None
    if record.head.n_classes != len(record.classes) or "mean" not in head_state:
        raise ArtifactError(f"{d}: head and classes disagree; the model directory is damaged")
    return Artifact(record, head_state, backbone_state)


def _validate(meta: dict, where: Path) -> int:
    """The format version of a headstart.json this headstart can read, or a refusal that says why."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{where}: not a headstart model file")
    try:
        format_version = int(meta.get("format_version", 1))
    except (TypeError, ValueError):
        raise ArtifactError(f"{where}: 'format_version' is not a number; the model directory is damaged") from None
    if format_version > FORMAT_VERSION:
        raise ArtifactError(f"{where}: saved by a newer headstart (format {meta['format_version']}); upgrade headstart")
    for key in ("classes", "backbone", "head"):
        if key not in meta:
            raise ArtifactError(f"{where}: missing '{key}'; the model directory is damaged")
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise ArtifactError(f"{where}: 'classes' must list at least two class names")
    return format_version


def _contiguous(v: np.ndarray) -> np.ndarray:
    """C-contiguous without changing the shape (np.ascontiguousarray turns a 0-d array, such as BatchNorm's
    num_batches_tracked, into shape (1,), which the backbone then refuses to load)."""
    v = np.asarray(v)
    return v if v.flags.c_contiguous else np.ascontiguousarray(v).reshape(v.shape)


def _spec_to_dict(spec: BackboneSpec) -> dict:
    d = asdict(spec)
    d["preprocess"] = spec.preprocess.to_dict()
    return d


def _spec_from_dict(d: dict) -> BackboneSpec:
    try:
        return BackboneSpec(
            name=str(d["name"]), timm_name=str(d["timm_name"]), preprocess=PreprocessConfig.from_dict(d["preprocess"]),
            source=str(d["source"]), params_m=float(d["params_m"]), feature_dim=int(d["feature_dim"]),
            package=d.get("package"), hf_hub_id=d.get("hf_hub_id"), any_input_size=bool(d.get("any_input_size", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"backbone description is damaged ({exc}); re-train the model") from None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("headstart", "torch", "timm", "onnxruntime", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
