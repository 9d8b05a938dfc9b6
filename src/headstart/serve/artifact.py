"""The saved model: a directory with `model.safetensors` (backbone + head tensors) and `headstart.json`
(everything needed to rebuild and use it). Loading validates both and never unpickles anything."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from headstart.backbones.registry import BackboneSpec
from headstart.errors import ArtifactError
from headstart.heads.config import HeadConfig
from headstart.paths import atomic_write_bytes, temp_path_beside
from headstart.vision.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

FORMAT = "headstart-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "headstart.json"


@dataclass
class Artifact:
    classes: list[str]
    backbone: BackboneSpec
    backbone_weights_id: str  # fingerprint of the backbone tensors: keys the exported-engine cache
    head: HeadConfig
    head_state: dict[str, np.ndarray]
    backbone_state: dict[str, np.ndarray] | None = None  # None when loaded lazily (predict reads it from disk)
    info: dict = field(default_factory=dict)  # training config, metrics, data counts, history, decisions


def save(artifact: Artifact, out_dir: str | Path) -> Path:
    """Write weights then metadata, each atomically; metadata last, so a directory with a valid
    headstart.json always has its weights."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": _contiguous(v) for k, v in artifact.head_state.items()}
    tensors.update({f"backbone.{k}": _contiguous(v) for k, v in (artifact.backbone_state or {}).items()})
    tmp = temp_path_beside(out / WEIGHTS_FILE)
    save_file(tensors, str(tmp))
    os.replace(tmp, out / WEIGHTS_FILE)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "classes": artifact.classes,
        "backbone": {**_spec_to_dict(artifact.backbone), "weights_id": artifact.backbone_weights_id},
        "head": artifact.head.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        **artifact.info,
    }
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
    _validate(meta, meta_path)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{weights_path}: corrupt weights file ({exc}); re-train or restore it") from None
    head_state = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    backbone_state = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")} if with_backbone else None
    try:
        head = HeadConfig.from_dict(meta["head"])
        weights_id = str(meta["backbone"]["weights_id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{meta_path}: damaged head or backbone ({exc!r}); re-train the model") from None
    if head.n_classes != len(meta["classes"]) or "mean" not in head_state:
        raise ArtifactError(f"{d}: head and classes disagree; the model directory is damaged")
    info = {k: v for k, v in meta.items() if k not in ("format", "format_version", "classes", "backbone", "head")}
    return Artifact(
        classes=list(meta["classes"]), backbone=_spec_from_dict(meta["backbone"]),
        backbone_weights_id=weights_id, head=head, head_state=head_state,
        backbone_state=backbone_state, info=info,
    )


def _validate(meta: dict, where: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{where}: not a headstart model file")
    try:
        format_version = int(meta.get("format_version", 0))
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
