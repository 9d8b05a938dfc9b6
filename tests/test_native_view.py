"""Native views for small photos (preprocess, data, engines, api) and the automatic head choice (train, api)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_BACKBONE, make_image_folder
from headstart.data.scan import typical_short_side
from headstart.vision.preprocess import PreprocessConfig, eval_transform, eval_views, normalize, with_native_view

# --- the rule and the transform ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "short_side, expected",
    [(128, 128), (134, 128), (100, 96), (20, 64), (135, 0), (300, 0), (2000, 0)],
)
def test_native_view_only_for_photos_much_smaller_than_the_input(short_side: int, expected: int) -> None:
    cfg = with_native_view(PreprocessConfig(224, 0.875), short_side)
    assert cfg.native_size == expected
    photo = Image.new("RGB", (short_side, short_side))
    assert len(eval_views(photo, cfg)) == (2 if expected else 1)
    assert dataclasses.replace(cfg, native_size=0) == PreprocessConfig(224, 0.875)  # nothing else changes


def test_native_view_is_the_whole_image_unresampled_at_its_own_size() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), "RGB")
    cfg = PreprocessConfig(224, 0.875, native_size=128)
    standard, native = eval_views(img, cfg)
    assert standard.shape == (3, 224, 224) and native.shape == (3, 128, 128)
    np.testing.assert_array_equal(standard, eval_transform(img, cfg))
    np.testing.assert_allclose(native, normalize(img, cfg), atol=1e-6)  # no crop, no blur: the photo itself
    (only,) = eval_views(img, PreprocessConfig(224, 0.875))
    np.testing.assert_array_equal(only, standard)


def test_config_round_trips_and_old_configs_have_no_native_view() -> None:
    cfg = PreprocessConfig(224, 0.875, native_size=96)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in PreprocessConfig(224, 0.875).to_dict().items() if k != "native_size"}
    assert PreprocessConfig.from_dict(old).native_size == 0


def test_typical_short_side_reads_headers_and_ignores_unreadable_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "p", classes=("a",), per_class=5, size=(64, 48))
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    make_image_folder(tmp_path / "p", classes=("b",), per_class=2, size=(300, 400))
    paths = sorted(root.rglob("*.jpg"))
    assert typical_short_side(paths) == 48  # 5 of 7 readable photos are 48 px on their short side
    assert typical_short_side([root / "a" / "broken.jpg"]) is None


# --- export: one graph for every view -------------------------------------------------------------------------


@pytest.fixture
def tiny_features(tiny_weights):
    from headstart.backbones.registry import resolve
    from headstart.runtime.frozen import FrozenBackbone

    return FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights).build_torch()


def test_export_for_other_sizes_matches_torch_at_each(tiny_features, tmp_path: Path) -> None:
    import torch

    from headstart.runtime.engines import OnnxEngine, ViewsEngine
    from headstart.runtime.export import any_size_path, export_onnx

    path = export_onnx(tiny_features, 160, tmp_path / "fixed.onnx", other_sizes=(64, 96))
    assert any_size_path(path).exists()
    with pytest.raises(Exception):
        OnnxEngine(path)(np.zeros((1, 3, 64, 64), np.float32))  # the fixed graph stays fixed, the fastest
    engine = ViewsEngine(path, 160)
    for size in (160, 64, 128):  # 128 was not among the checked sizes: any multiple of the stride works
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = tiny_features(x).numpy()
        np.testing.assert_allclose(engine(x.numpy()), expected, atol=1e-4)


def test_export_for_other_sizes_when_the_input_size_is_not_a_multiple_of_the_stride(tmp_path: Path) -> None:
    """TensorFlow-style 'same' pads (the tf_efficientnet_lite models) traced at 176 px, like lite1's 240, are
    wrong at 64 or 128 px: the twin for other sizes must be traced at one of them."""
    import timm
    import torch

    from headstart.runtime.engines import ViewsEngine
    from headstart.runtime.export import export_onnx
    from headstart.backbones.pooled import PooledFeatures

    torch.manual_seed(0)
    net = PooledFeatures(timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0, pad_type="same")).eval()
    engine = ViewsEngine(export_onnx(net, 176, tmp_path / "fixed.onnx", other_sizes=(64, 96)), 176)
    for size in (176, 64, 128):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = net(x).numpy()
        np.testing.assert_allclose(engine(x.numpy()), expected, atol=1e-4)


def test_export_refuses_a_graph_that_cannot_take_other_sizes(tmp_path: Path) -> None:
    import torch

    from headstart.runtime.export import export_onnx

    # torch takes any size here; the traced graph pools with a kernel fixed for 32 px, and its Linear then fails.
    fixed = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 5)
    ).eval()
    with pytest.raises(RuntimeError, match="64 px"):  # traced again at 96 px, it still fails at 64
        export_onnx(fixed, 32, tmp_path / "fixed.onnx", other_sizes=(64, 96))
    assert list(tmp_path.iterdir()) == []  # neither graph, nor a temporary file, is left


# --- the classifier --------------------------------------------------------------------------------------------


@pytest.fixture
def any_size_clf(tiny_weights, monkeypatch: pytest.MonkeyPatch):
    """The tiny backbone declared any-size, as the Lite family is: fit adds native views for small photos."""
    import headstart.api as api

    real = api.resolve
    monkeypatch.setattr(api, "resolve", lambda name: dataclasses.replace(real(name), any_input_size=True))

    def make(**kwargs):
        return api.ImageClassifier(TINY_BACKBONE, weights=tiny_weights, **{"epochs": 8, "device": "cpu", **kwargs})

    return make


def test_small_photos_get_a_native_view_that_travels_with_the_model(any_size_clf, tmp_path: Path) -> None:
    from headstart import ImageClassifier

    photos = make_image_folder(tmp_path / "photos", per_class=6, size=(64, 48))  # short side 48: 30% of 160 px
    clf = any_size_clf().fit(photos)
    assert clf.decision_["native_size"] == 64 and clf.frozen_.spec.preprocess.native_size == 64
    single = any_size_clf(native_view=False).fit(photos)
    assert single.frozen_.spec.preprocess.native_size == 0
    assert clf.head_config_.in_features == 2 * single.head_config_.in_features

    clf.save(tmp_path / "model")
    loaded = ImageClassifier.load(tmp_path / "model", device="cpu")
    assert loaded.frozen_.spec.preprocess.native_size == 64
    images = sorted(photos.rglob("*.jpg"))
    np.testing.assert_allclose(loaded.predict_proba(images), clf.predict_proba(images), atol=1e-5)
    assert loaded.score(photos) == clf.score(photos)


def _tiny_preprocess() -> PreprocessConfig:
    from headstart.backbones.registry import resolve

    return resolve(TINY_BACKBONE).preprocess


def test_no_native_view_for_large_photos(any_size_clf, tmp_path: Path) -> None:
    large = make_image_folder(tmp_path / "large", per_class=4, size=(200, 160))
    assert any_size_clf(epochs=2).fit(large).frozen_.spec.preprocess.native_size == 0
    tuned = any_size_clf(epochs=2, strategy="finetune", finetune_epochs=1, views=1).fit(large)
    assert tuned.frozen_.spec.preprocess == _tiny_preprocess()


def test_fine_tuning_runs_the_network_at_the_photos_own_size(any_size_clf, tmp_path: Path) -> None:
    from headstart import ImageClassifier

    small = make_image_folder(tmp_path / "small", per_class=4, size=(64, 48))  # short side 48: 30% of 160 px
    tuned = any_size_clf(epochs=2, strategy="finetune", finetune_epochs=1, views=1).fit(small)
    pre = tuned.frozen_.spec.preprocess
    assert (pre.input_size, pre.crop_pct, pre.native_size) == (64, 1.0, 0)  # one view: the whole photo
    assert tuned.decision_["native_input"] == 64
    assert tuned.decision_["finetune_config"]["unfreeze"] == "all"  # at its own size, every stage is affordable
    tuned.save(tmp_path / "model")
    loaded = ImageClassifier.load(tmp_path / "model", device="cpu")
    assert loaded.frozen_.spec.preprocess == pre
    images = sorted(small.rglob("*.jpg"))
    np.testing.assert_allclose(loaded.predict_proba(images), tuned.predict_proba(images), atol=1e-5)
    kept_size = any_size_clf(epochs=2, strategy="finetune", finetune_epochs=1, views=1, native_view=False).fit(small)
    assert kept_size.frozen_.spec.preprocess == _tiny_preprocess()


# --- choosing the head -------------------------------------------------------------------------------------


def _xor(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes that no linear head separates (the sign of x0 * x1) and one hidden layer does."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] * x[:, 1] > 0).astype(np.int64)


def test_best_head_is_the_one_with_the_lowest_validation_loss() -> None:
    from headstart.heads.config import HeadConfig
    from headstart.train.config import TrainConfig
    from headstart.train.fit_head import fit_best_head, fit_head

    (xt, yt), (xv, yv) = _xor(600, 0), _xor(200, 1)
    cfg = TrainConfig(epochs=40, lr=1e-2, seed=3)
    candidates = [(HeadConfig(6, 2, (), 0.0), cfg), (HeadConfig(6, 2, (32,), 0.0), cfg)]
    head, history, kept_cfg, losses = fit_best_head(candidates, xt, yt, xv, yv)
    assert head.cfg.hidden == (32,) and kept_cfg == cfg
    assert losses[1] < losses[0] and min(history.val_loss) == losses[1]
    # Fitting side by side gives exactly what fitting that candidate alone gives.
    alone, _ = fit_head(HeadConfig(6, 2, (32,), 0.0), cfg, xt, yt, xv, yv)
    for name, value in alone.state_dict().items():
        assert np.array_equal(value.numpy(), head.state_dict()[name].numpy()), name


@pytest.mark.parametrize(
    "hidden, n_train, has_val, finetune_follows, expected",
    [
        ("auto", 2000, True, False, [(), (64,)]),
        ("auto", 999, True, False, [()]),  # too few photos to fit a hidden layer
        ("auto", 2000, False, False, [()]),  # nothing to choose by
        ("auto", 2000, True, True, [()]),  # stage 2 starts best from a linear head
        ((128,), 2000, True, True, [(128,)]),  # what the user asked for
        ((), 2000, True, False, [()]),
    ],
)
def test_head_candidates(hidden, n_train: int, has_val: bool, finetune_follows: bool, expected: list) -> None:
    from headstart.heads.config import HeadConfig
    from headstart.train.config import TrainConfig
    from headstart.train.fit_head import head_candidates

    cfg = TrainConfig(epochs=60, patience=10)
    candidates = head_candidates(hidden, 0.3, HeadConfig(100, 4), cfg, n_train, has_val, finetune_follows)
    assert all((c.in_features, c.n_classes) == (100, 4) for c, _ in candidates)
    assert [c.hidden for c, _ in candidates] == expected
    assert candidates[0][1] == cfg and candidates[0][0].dropout == 0.3
    if len(candidates) == 2:
        assert candidates[1][0].dropout == 0.6 and candidates[1][1].epochs == 20 and candidates[1][1].patience == 5


def test_auto_head_is_linear_when_fine_tuning_follows(any_size_clf, image_folder, monkeypatch) -> None:
    import headstart.train.fit_head as train

    monkeypatch.setattr(train, "AUTO_HIDDEN_MIN_TRAIN", 1)  # the generated folder is far below 1,000 photos
    head_only = any_size_clf(epochs=3).fit(image_folder)
    assert [c["hidden"] for c in head_only.decision_["head_candidates"]] == [[], [64]]
    tuned = any_size_clf(epochs=3, strategy="finetune", finetune_epochs=1, views=1).fit(image_folder)
    assert "head_candidates" not in tuned.decision_  # stage 2 starts from a linear head, its better start
    assert tuned.head_config_.hidden == ()
