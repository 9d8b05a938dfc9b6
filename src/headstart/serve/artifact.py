"""The saved model: a directory with `model.safetensors` (backbone + head tensors) and `headstart.json`, a
`ModelRecord` (everything needed to rebuild and use the model, and the run's `FitReport`). Loading validates both,
reads every format this project has written, refuses newer ones, and never unpickles anything.

Loading checks the weights against the record: every head tensor's shape against the `HeadConfig`, every tensor
(head and backbone, read one at a time) finite, the class names unique and non-empty; anything else is one
ArtifactError line naming what is wrong.

Saving is one atomic step however many files it writes: both files are written into `model/.saving/`, which is
renamed to `model/.saved/` when complete (the commit point), whose files then replace the old ones. A save
killed before the commit leaves the old model (`.saving/` is ignored, and removed by the next save); one killed
after it is completed by the next load or save, and until then loading reads the committed files. So `model/` is
always the old complete model or the new complete one, never a mix.

Formats of headstart.json:
- 1: the run's record spread over the top level (params, train, history, counts, metrics, skipped, decision as
  a flat dict); models saved before the native view have no `native_size` in their preprocessing.
- 2: the run's record whole under "fit" (`FitReport.to_dict`), the settings under "params". The head's
  "temperature" (probabilities are softmax(logits / T)) came later within format 2: a record without one loads
  with T = 1, the softmax it was saved with; older headstarts ignore it. Multi-label heads ("multi_label": true,
  one "thresholds" entry per label, sigmoid outputs) and their metrics under "fit" -> "multilabel" came later
  within format 2: a record without them is single-label.
- 3: format 2 with a "companion" backbone (a second backbone whose features follow the first's, its tensors under
  "companion." in the weights). Written only for such models, so that an older headstart refuses them in one line
  ("saved by a newer headstart") instead of failing on the head's width; every other model is still written as 2.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from headstart.backbones.registry import BackboneSpec
from headstart.errors import ArtifactError
from headstart.heads.config import HeadConfig
from headstart.paths import disk_space, ordinary_mode
from headstart.records import DistributedRun, FitReport
from headstart.vision.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

FORMAT = "headstart-model"
FORMAT_VERSION = 3  # the newest this headstart reads
PLAIN_FORMAT_VERSION = 2  # what a model without a companion is written as (see the module docstring)
WEIGHTS_FILE = "model.safetensors"
META_FILE = "headstart.json"
STAGING_DIR = ".saving"  # a save being written: ignored by load, removed by the next save
COMMITTED_DIR = ".saved"  # a save complete and committed: its files replace the directory's (see the docstring)
_DAMAGED = (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError)  # what a bad field raises


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
    companion: BackboneSpec | None = None  # a second backbone on the same inputs (`FrozenBackbone.companion`)
    companion_weights_id: str = ""

    def to_dict(self) -> dict:
        companion = ({"companion": {**_spec_to_dict(self.companion), "weights_id": self.companion_weights_id}}
                     if self.companion is not None else {})
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION if companion else PLAIN_FORMAT_VERSION,
            "classes": list(self.classes),
            "backbone": {**_spec_to_dict(self.backbone), "weights_id": self.backbone_weights_id},
            "head": self.head.to_dict(), "params": self.params, "fit": self.fit.to_dict() if self.fit else None,
            "distributed": (self.fit.distributed if self.fit else DistributedRun()).to_dict(),
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": self.versions or _versions(),
            **companion,
        }

    @classmethod
    def from_dict(cls, meta: dict, where: Path) -> "ModelRecord":
        version = _validate(meta, where)
        try:
            head = HeadConfig.from_dict(meta["head"])
            weights_id = str(meta["backbone"]["weights_id"])
            fit = meta.get("fit") if version >= 2 else meta
            report = (FitReport.from_dict(fit) if version >= 2 else FitReport.from_v1(fit)) if fit else None
            if report and isinstance(meta.get("distributed"), dict):  # older models have none: one process
                report = replace(report, distributed=DistributedRun.from_dict(meta["distributed"]))
            params, versions = dict(meta.get("params") or {}), dict(meta.get("versions") or {})
            companion = meta.get("companion")
            companion_id = str(companion["weights_id"]) if companion is not None else ""
        except _DAMAGED as exc:
            raise ArtifactError(f"{where}: damaged record ({_one_line(exc)}); re-train the model") from None
        _check_head_config(head, len(meta["classes"]), where)
        return cls(tuple(meta["classes"]), _spec_from_dict(meta["backbone"], where), weights_id, head, params, report,
                   str(meta.get("created", "")), versions,
                   _spec_from_dict(companion, where) if companion is not None else None, companion_id)


@dataclass(eq=False)
class Artifact:
    record: ModelRecord
    head_state: dict[str, np.ndarray]
    backbone_state: dict[str, np.ndarray] | None = None  # None when loaded lazily (predict reads it from disk)
    weights_path: Path | None = None  # where load found the weights (the backbone is read from there)
    companion_state: dict[str, np.ndarray] | None = None  # the companion backbone's, as `backbone_state`


def save(artifact: Artifact, out_dir: str | Path) -> Path:
    """Write the model into `out_dir` in one atomic step (see the module docstring): after a crash at any point
    the directory holds the old complete model or the new complete one. Other files in it are left alone."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    tensors = {f"head.{k}": _contiguous(v) for k, v in artifact.head_state.items()}
    tensors.update({f"backbone.{k}": _contiguous(v) for k, v in (artifact.backbone_state or {}).items()})
    tensors.update({f"companion.{k}": _contiguous(v) for k, v in (artifact.companion_state or {}).items()})
    meta = json.dumps(artifact.record.to_dict(), indent=2, default=_jsonable).encode()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _complete_save(out)  # an earlier save that was committed is finished first: the old model is whole
        staging = out / STAGING_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        with disk_space(staging / WEIGHTS_FILE):  # a full disk is one line, whatever the writer's own words
            save_file(tensors, str(staging / WEIGHTS_FILE))
            (staging / META_FILE).write_bytes(meta)
        ordinary_mode(staging / WEIGHTS_FILE)  # safetensors writes 0600, whatever the umask
        for path in (staging / WEIGHTS_FILE, staging / META_FILE, staging):
            _fsync(path)  # on disk before the commit, so that a power cut cannot commit a half-written file
        os.rename(staging, out / COMMITTED_DIR)  # the commit point
        _fsync(out)
        _complete_save(out)
    except OSError as exc:
        raise ArtifactError(f"{out}: cannot save the model ({exc.strerror or exc}); choose a writable "
                            "directory") from None
    return out


def check_writable(out_dir: str | Path) -> Path:
    """Refuse, before any training, an output directory that `save` could not write: a file, a path under a file,
    or a place where nothing can be created (read-only, no permission). Creates nothing that stays."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: is a file, not a model directory; choose another output directory")
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise ArtifactError(f"{out}: {existing} is a file, so no directory can be made there; choose another "
                            "output directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".headstart-probe-", dir=existing))
    except OSError as exc:
        raise ArtifactError(f"{out}: cannot write in {existing} ({exc.strerror or exc}); choose a writable "
                            "output directory") from None
    return out


def load(model_dir: str | Path, with_backbone: bool = False) -> Artifact:
    """The model in `model_dir`, checked whole: the record, and every tensor against it (shapes, finiteness)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ArtifactError(f"{d}: no such model directory; train one with `headstart train DATA --out {d}`")
    try:
        _complete_save(d)
    except OSError:  # a read-only copy: the committed files are read where they are (`_model_files`)
        pass
    meta_path, weights_path = _model_files(d)
    if not meta_path.is_file() or not weights_path.is_file():
        missing = META_FILE if not meta_path.is_file() else WEIGHTS_FILE
        raise ArtifactError(f"{d}: not a headstart model (no {missing}); train one with `headstart train`")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{meta_path}: unreadable metadata ({exc.__class__.__name__}); re-train or restore it")
    except OSError as exc:
        raise ArtifactError(f"{meta_path}: cannot read it ({exc.strerror or exc})") from None
    record = ModelRecord.from_dict(meta, meta_path)
    head_state, backbone_state, companion_state = _read_weights(weights_path, record, with_backbone)
    return Artifact(record, head_state, backbone_state, weights_path, companion_state)


def _model_files(d: Path) -> tuple[Path, Path]:
    """headstart.json and model.safetensors of `d`: a committed save's where it has not been moved into place."""
    committed = d / COMMITTED_DIR
    return tuple(committed / name if (committed / name).is_file() else d / name  # type: ignore[return-value]
                 for name in (META_FILE, WEIGHTS_FILE))


def _complete_save(d: Path) -> None:
    """Move a committed save's files into place (each move atomic; a repeat after a crash moves what is left)."""
    committed = d / COMMITTED_DIR
    if not committed.is_dir():
        return
    for name in (WEIGHTS_FILE, META_FILE):
        try:
            os.replace(committed / name, d / name)
        except FileNotFoundError:  # moved already
            pass
    _fsync(d)
    committed.rmdir()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on Windows; its entries are durable there without it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_weights(path: Path, record: ModelRecord, with_backbone: bool
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
    """The head's tensors (checked against the record) and, if asked, the backbone's and its companion's; every
    tensor is read, one at a time, and must be finite, whether it is kept or not."""
    from safetensors import SafetensorError, safe_open

    head: dict[str, np.ndarray] = {}
    backbone: dict[str, np.ndarray] = {}
    companion: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            for key in keys:
                tensor = f.get_tensor(key)
                if tensor.dtype.kind in "fc" and not np.isfinite(tensor).all():
                    raise ArtifactError(f"{path}: tensor '{key}' holds NaN or infinite values; the model is damaged "
                                        "or its training diverged: re-train it")
                if key.startswith("head."):
                    head[key[5:]] = tensor
                elif key.startswith("backbone.") and with_backbone:
                    backbone[key[9:]] = tensor
                elif key.startswith("companion.") and with_backbone:
                    companion[key[10:]] = tensor
    except (SafetensorError, OSError, ValueError, TypeError, OverflowError) as exc:
        raise ArtifactError(f"{path}: corrupt weights file ({_one_line(exc)}); re-train or restore it") from None
    if not any(k.startswith("backbone.") for k in keys):
        raise ArtifactError(f"{path}: holds no backbone tensors; the model directory is damaged")
    if record.companion is not None and not any(k.startswith("companion.") for k in keys):
        raise ArtifactError(f"{path}: holds no tensors of the companion backbone its record names; the model "
                            "directory is damaged")
    _check_head_state(head, record.head, path)
    if not with_backbone:
        return head, None, None
    return head, backbone, companion if record.companion is not None else None


def _check_head_config(head: HeadConfig, n_classes: int, where: Path) -> None:
    if head.n_classes != n_classes:
        raise ArtifactError(f"{where}: the head has {head.n_classes} outputs for {n_classes} classes; the model "
                            "directory is damaged")
    if head.in_features < 1 or any(h < 1 for h in head.hidden) or not 0.0 <= head.dropout < 1.0 \
            or not 0.0 < head.temperature < float("inf"):
        raise ArtifactError(f"{where}: impossible head {head}; the model directory is damaged")
    if head.multi_label and (len(head.thresholds) != n_classes or not all(0.0 <= t <= 1.0 for t in head.thresholds)):
        raise ArtifactError(f"{where}: a multi-label head needs one threshold in [0, 1] per label ({n_classes}), "
                            f"not {list(head.thresholds)}; the model directory is damaged")


def head_shapes(cfg: HeadConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a head with this config and its shape: mean/std [in_features], then each Linear's weight
    and bias from in_features through the hidden widths to n_classes (`heads.module.Head`'s layout)."""
    shapes: dict[str, tuple[int, ...]] = {"mean": (cfg.in_features,), "std": (cfg.in_features,)}
    widths = (cfg.in_features, *cfg.hidden, cfg.n_classes)
    for n, (w_in, w_out) in enumerate(zip(widths, widths[1:])):
        index = 1 + 3 * n  # Dropout, then (Linear, ReLU, Dropout) per hidden layer, then the last Linear
        shapes[f"layers.{index}.weight"] = (w_out, w_in)
        shapes[f"layers.{index}.bias"] = (w_out,)
    return shapes


def _check_head_state(state: dict[str, np.ndarray], cfg: HeadConfig, where: Path) -> None:
    expected = head_shapes(cfg)
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        what = f"lacks {missing}" if missing else f"has unexpected tensors {extra}"
        raise ArtifactError(f"{where}: the head {what} for its config ({_describe(cfg)}); the model is damaged")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ArtifactError(f"{where}: head tensor '{key}' has shape {list(state[key].shape)}, the config "
                                f"({_describe(cfg)}) needs {list(shape)}; the model is damaged")
    if (state["std"] <= 0).any():
        raise ArtifactError(f"{where}: the head's feature std has zero or negative values; the model is damaged")


def _describe(cfg: HeadConfig) -> str:
    return f"{cfg.in_features} features, hidden {list(cfg.hidden)}, {cfg.n_classes} classes"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


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
    if not all(c.strip() for c in classes):
        raise ArtifactError(f"{where}: 'classes' holds an empty class name; the model directory is damaged")
    duplicates = sorted(c for c, n in Counter(classes).items() if n > 1)
    if duplicates:
        raise ArtifactError(f"{where}: 'classes' names {duplicates} more than once; the model directory is damaged")
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


def _spec_from_dict(d: dict, where: Path) -> BackboneSpec:
    try:
        return BackboneSpec(
            name=str(d["name"]), timm_name=str(d["timm_name"]), preprocess=PreprocessConfig.from_dict(d["preprocess"]),
            source=str(d["source"]), params_m=float(d["params_m"]), feature_dim=int(d["feature_dim"]),
            package=d.get("package"), hf_hub_id=d.get("hf_hub_id"), any_input_size=bool(d.get("any_input_size", False)),
        )
    except _DAMAGED as exc:
        raise ArtifactError(f"{where}: backbone description is damaged ({_one_line(exc)}); re-train the model") from None


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
