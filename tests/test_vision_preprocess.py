"""vision.preprocess: the native view for small photos (the rule, the transform, the config round trip) and
load_for_model's shape and dtype. Torch-free."""

from __future__ import annotations


import numpy as np
from PIL import Image

from helpers_images import noise_pixels
from headstart.vision.preprocess import (
    PreprocessConfig, eval_transform, eval_views, load_for_model, normalize,
)


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


def test_load_for_model_shape_and_dtype(tmp_path):
    path = tmp_path / "x.jpg"
    Image.fromarray(noise_pixels(300, 500)).save(path)
    arr = load_for_model(path, PreprocessConfig())
    assert arr.dtype == np.float32 and arr.shape == (3, 224, 224)
