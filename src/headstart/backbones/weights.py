"""Backbone weights as local safetensors files: the bundled Lite packages converted once, hub weights saved once,
fingerprints for cache keys, and building a timm model from a file. torch and timm are imported only inside the
functions that need them.

A user's weights file is data, never code: `.safetensors` is read as it is; a torch file (`.pt`, `.pth`, `.bin`,
`.ckpt`) only through `torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers and
refuses every other object (a crafted pickle is an error, its payload never runs), and then converted once to a
safetensors file in the cache (`as_safetensors`), which is what everything downstream reads.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from headstart.backbones.registry import BackboneSpec
from headstart.errors import WeightsError
from headstart.paths import atomic_path, cache_root, file_sha256

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def converted_weights_path(spec: BackboneSpec) -> Path:
    """The bundled weights as a timm-layout safetensors file, converted on first use and cached."""
    target = cache_root() / "weights" / f"{spec.timm_name}.safetensors"
    if target.exists():
        return target
    if spec.package is None or importlib.util.find_spec(spec.package) is None:
        raise WeightsError(
            f"weights for '{spec.name}' are not installed: run `pip install {spec.package.replace('_', '-')}`"
        )
    import torch

    pkg_dir = Path(importlib.util.find_spec(spec.package).origin).parent / "models"
    pth = next(pkg_dir.glob("*.pth"))
    # The only torch.load in headstart: the bundled file is read once, tensors only, and never again.
    source = torch.load(pth, map_location="cpu", weights_only=True)
    save_state_dict(_lukemelas_to_timm(source, _timm_state_keys(spec.timm_name)), target)
    log.info("converted %s -> %s", pth.name, target)
    return target


def _timm_state_keys(timm_name: str) -> dict[str, tuple[int, ...]]:
    import timm

    model = timm.create_model(timm_name, pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _lukemelas_to_timm(source: dict, target_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Rename lukemelas keys to timm's. Both list every module's tensors in the same order (lukemelas numbers
    blocks flatly, `_blocks.N`, where timm nests them by stage, `blocks.s.i`), so tensors pair up in order; each
    pair is checked by leaf name and shape, which makes a silent mismatch impossible."""
    src_keys, dst_keys = list(source), list(target_shapes)
    if len(src_keys) != len(dst_keys):
        raise WeightsError(f"bundled weights have {len(src_keys)} tensors, timm expects {len(dst_keys)}")
    out = {}
    for src_k, dst_k in zip(src_keys, dst_keys):
        src_leaf, dst_leaf = src_k.rsplit(".", 1)[1], dst_k.rsplit(".", 1)[1]
        if src_leaf != dst_leaf or tuple(source[src_k].shape) != target_shapes[dst_k]:
            raise WeightsError(f"bundled weights do not match timm: {src_k} {tuple(source[src_k].shape)} vs {dst_k}")
        out[dst_k] = source[src_k]
    return out


def pretrained_weights_path(spec: BackboneSpec) -> Path:
    """The spec's pretrained weights as a local safetensors file: converted from the bundled package, or saved
    once from timm's hub loading, so that everything downstream (fingerprints, exports, saved models) reads one
    kind of file."""
    if spec.source == "package":
        return converted_weights_path(spec)
    target = cache_root() / "weights" / f"{spec.name.replace('/', '_')}.safetensors"
    if not target.exists():
        save_state_dict(create_model(spec).state_dict(), target)
    return target


def save_state_dict(state: dict, target: Path, content_named: bool = False) -> tuple[Path, str]:
    """Write torch tensors as safetensors atomically (temporary file, then rename). With `content_named`, the
    file is named by its content: `x.safetensors` becomes `x-<fingerprint>.safetensors`. Returns the path and
    the content's full sha256."""
    from safetensors.torch import save_file

    writer = atomic_path(target)
    with writer as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        digest = file_sha256(tmp)
        if content_named:
            writer.target = target.with_name(f"{target.stem}-{digest[:16]}{target.suffix}")
    return writer.target, digest


def weights_fingerprint(path: Path) -> str:
    """The short content id used in cache keys; equal to the name `save_state_dict(content_named=True)` gives."""
    return file_sha256(path)[:16]


def create_model(
    spec: BackboneSpec, weights: Path | None = None, with_classifier: bool = False, prefix: str = ""
) -> "torch.nn.Module":
    """The pretrained backbone as a timm model in eval mode; pooled features out unless `with_classifier`."""
    import timm

    num_classes = 1000 if with_classifier else 0
    if weights is None and spec.source == "package":
        weights = converted_weights_path(spec)
    if weights is None:
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, num_classes=num_classes)
        except Exception as exc:  # timm raises a variety of hub/network errors; all mean "no weights here"
            raise WeightsError(
                f"could not load pretrained weights for '{spec.name}' ({type(exc).__name__}): they are not in the "
                f"hub cache and there is no network; pass --weights FILE.safetensors or use efficientnet_lite0"
            ) from None
        return model.eval()
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes)
    load_weights_file(model, weights, prefix)
    return model.eval()


def load_weights_file(model: "torch.nn.Module", path: Path, prefix: str = "") -> None:
    """Load a state dict file into `model`, dropping a classifier that does not fit (as timm does)."""
    state = {k[len(prefix):]: v for k, v in read_state_dict(path).items() if k.startswith(prefix)}
    own = model.state_dict()
    dropped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    state = {k: v for k, v in state.items() if k in own and k not in dropped}
    missing = [k for k in own if k not in state]
    if len(missing) > len(own) // 10:
        raise WeightsError(f"{path}: only {len(state)} of {len(own)} tensors fit this backbone; is it the right model?")
    if missing or dropped:
        log.info("weights %s: %d missing keys, %d dropped (shape mismatch)", path.name, len(missing), len(dropped))
    model.load_state_dict(state, strict=False)


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_state_dict(path: Path) -> dict:
    """The tensors of a weights file: safetensors as it is, a torch file only with `weights_only=True` (never a
    full unpickle). A torch checkpoint's tensors may sit under "state_dict" or "model"."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc}); re-download or convert it") from None
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise WeightsError(f"{path}: weights must be .safetensors (or a torch file: {', '.join(TORCH_SUFFIXES)})")
    return _torch_tensors(path)


def _torch_tensors(path: Path) -> dict:
    import pickle

    import torch

    try:
        # weights_only=True: torch's restricted unpickler, which refuses any global but tensors and containers.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, OSError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise WeightsError(f"{path}: refused: not a plain tensor file ({type(exc).__name__}: {reason}); "
                           "pass weights as .safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(obj, dict) else {}
    if not tensors:
        raise WeightsError(f"{path}: holds no named tensors (a state dict); pass the backbone's weights")
    return tensors


def as_safetensors(path: Path) -> Path:
    """`path` if it is a safetensors file; a torch file converted once (tensors only, see `read_state_dict`) into
    the cache, named by the source's content, so that fingerprints, exports and saved models read one format."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    target = cache_root() / "weights" / f"user-{path.stem}-{file_sha256(path)[:16]}.safetensors"
    if not target.exists():
        save_state_dict(read_state_dict(path), target)
        log.info("converted %s -> %s (tensors only)", path, target)
    return target
