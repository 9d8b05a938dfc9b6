"""Backbones: the bundled weights are real ImageNet weights, the registry agrees with timm, the hub path works
offline from a local cache, and user weights are never unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from helpers_cli import assert_one_line
from helpers_models import TINY_BACKBONE
from headstart.backbones.registry import REGISTRY, available_offline, resolve
from headstart.errors import WeightsError
from headstart.backbones.weights import create_model, load_weights_file, read_state_dict
from headstart.vision.preprocess import eval_transform

import torch  # noqa: E402
import timm  # noqa: E402

HUB_BACKBONES = ("mobilenetv2_100", "efficientnet_b0", "resnet50", "vgg16", "convnext_tiny")
IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


# --- the bundled EfficientNet-Lite0 weights --------------------------------------------------------------------

def test_bundled_lite0_weights_classify_imagenet_photos(lite0_cache):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    spec = resolve("efficientnet_lite0")
    assert spec.source == "package" and available_offline(spec)
    model = create_model(spec, with_classifier=True)
    assert not model.training
    batch = np.stack([eval_transform(Image.fromarray(img), spec.preprocess)
                      for img in (skimage_data.chelsea(), skimage_data.coffee())])
    assert batch.shape == (2, 3, 224, 224)
    with torch.no_grad():
        probs = model(torch.from_numpy(batch)).softmax(1).numpy()
    cat_top3 = set(np.argsort(-probs[0])[:3].tolist())
    assert cat_top3 & IMAGENET_CATS, f"chelsea's top 3 {cat_top3} has no cat class"
    assert int(probs[1].argmax()) == ESPRESSO
    # The conversion is cached: a second build reads the converted file, not the package.
    assert (lite0_cache / "weights" / f"{spec.timm_name}.safetensors").exists()


def test_bundled_weights_feature_model_has_no_classifier(lite0_cache):
    model = create_model(resolve("efficientnet_lite0"))
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, REGISTRY["efficientnet_lite0"].feature_dim)


# --- the registry agrees with timm -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", HUB_BACKBONES)
def test_registry_matches_timm_pretrained_config(name):
    spec = REGISTRY[name]
    cfg = timm.models.get_pretrained_cfg(name)
    assert spec.source == "hub" and spec.timm_name == name
    assert spec.hf_hub_id == cfg.hf_hub_id
    assert spec.preprocess.input_size == cfg.input_size[-1] == cfg.input_size[-2]
    assert spec.preprocess.crop_pct == pytest.approx(cfg.crop_pct)
    assert spec.preprocess.interpolation == cfg.interpolation
    assert spec.preprocess.mean == pytest.approx(tuple(cfg.mean))
    assert spec.preprocess.std == pytest.approx(tuple(cfg.std))


@pytest.mark.parametrize("name", HUB_BACKBONES)
def test_registry_size_and_feature_dim_match_timm(name):
    model = timm.create_model(name, pretrained=False, num_classes=0)
    # Pooled features are what a classifier would see: head_hidden_size where timm has a pre-logits MLP (VGG).
    assert REGISTRY[name].feature_dim == getattr(model, "head_hidden_size", model.num_features)
    assert REGISTRY[name].params_m == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=0.05)


def test_lite_registry_uses_tf_preprocessing():
    for n, size in ((0, 224), (1, 240), (2, 260)):
        spec = REGISTRY[f"efficientnet_lite{n}"]
        assert spec.timm_name == f"tf_efficientnet_lite{n}"
        assert spec.preprocess.input_size == size
        assert spec.preprocess.mean == spec.preprocess.std == (0.5, 0.5, 0.5)


def test_resolve_unregistered_timm_name_takes_timm_config():
    spec = resolve(TINY_BACKBONE)
    cfg = timm.models.get_pretrained_cfg(TINY_BACKBONE)
    assert (spec.source, spec.timm_name, spec.hf_hub_id) == ("hub", TINY_BACKBONE, cfg.hf_hub_id)
    assert spec.preprocess.input_size == 160
    assert spec.preprocess.crop_pct == pytest.approx(cfg.crop_pct)


def test_unknown_backbone_is_a_one_line_weights_error():
    with pytest.raises(WeightsError) as err:
        resolve("no_such_net_xyz")
    assert_one_line(str(err.value), "no_such_net_xyz")


# --- the hub path, offline, from a local Hugging Face cache ------------------------------------------------------

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _point_hub_cache_at(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants as hub_constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import; its functions look them up on the module at call time.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> tuple[Path, dict]:
    """A Hugging Face hub cache holding timm/test_efficientnet.r160_in1k (random 1000-class weights)."""
    from safetensors.torch import save_file

    spec = resolve(TINY_BACKBONE)
    repo_dir = tmp_path / "hf" / "hub" / f"models--{spec.hf_hub_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / FAKE_COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(FAKE_COMMIT)
    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in timm.create_model(TINY_BACKBONE, pretrained=False).state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    _point_hub_cache_at(monkeypatch, tmp_path / "hf" / "hub")
    return tmp_path / "hf" / "hub", state


def test_hub_backbone_loads_offline_from_local_cache(hub_cache):
    _, state = hub_cache
    spec = resolve(TINY_BACKBONE)
    assert available_offline(spec)
    model = create_model(spec)
    own = model.state_dict()
    for key in ("conv_stem.weight", "blocks.4.0.conv_pwl.weight", "conv_head.weight", "bn2.running_var"):
        assert torch.equal(own[key], state[key]), key
    assert not model.training
    # Features out, not ImageNet logits.
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 160, 160)).shape == (1, model.num_features)


def test_hub_backbone_with_classifier_keeps_hub_classifier(hub_cache):
    _, state = hub_cache
    model = create_model(resolve(TINY_BACKBONE), with_classifier=True)
    assert torch.equal(model.state_dict()["classifier.weight"], state["classifier.weight"])


def test_hub_backbone_missing_from_empty_cache(tmp_path, monkeypatch):
    _point_hub_cache_at(monkeypatch, tmp_path / "empty-hub")
    spec = resolve(TINY_BACKBONE)
    assert not available_offline(spec)
    with pytest.raises(WeightsError) as err:
        create_model(spec)
    assert_one_line(str(err.value), "--weights", TINY_BACKBONE)


# --- weights files ---------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pkl", ".bin"])
def test_read_state_dict_refuses_pickle_files(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(pickle.dumps({"conv_stem.weight": _Payload(marker)}))
    with pytest.raises(WeightsError) as err:
        read_state_dict(path)
    assert_one_line(str(err.value), "safetensors")
    assert not marker.exists()


def test_read_state_dict_missing_file(tmp_path):
    with pytest.raises(WeightsError) as err:
        read_state_dict(tmp_path / "nope.safetensors")
    assert_one_line(str(err.value), "not found")


def test_explicit_weights_file_is_loaded(tiny_weights):
    from safetensors.torch import load_file

    model = create_model(resolve(TINY_BACKBONE), weights=tiny_weights)
    expected = load_file(str(tiny_weights))
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_weights_for_another_architecture_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()},
              str(path))
    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0)
    with pytest.raises(WeightsError) as err:
        load_weights_file(model, path)
    assert_one_line(str(err.value), "right model")
