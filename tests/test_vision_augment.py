"""vision.augment: augmented views are deterministic per seed, leave torch's RNG alone, "none" is the eval
transform, unknown levels are refused, and the 8-bit views normalise to exactly the float views."""

from __future__ import annotations

import numpy as np
from PIL import Image
import pytest

from helpers_images import make_image

torch = pytest.importorskip("torch")

from headstart.vision.augment import augmented_pixels, augmented_view, normalize_pixels  # noqa: E402
from headstart.vision.preprocess import PreprocessConfig, eval_transform  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest: the tiny model's steps, one thread


@pytest.fixture
def photo():
    return make_image((200, 60, 60), (90, 70), np.random.default_rng(0))


@pytest.mark.parametrize("level", ["light", "strong", "flips", "turns"])
def test_augmented_view_is_deterministic_per_seed_and_varies_across_seeds(photo, level):
    cfg = PreprocessConfig(input_size=48)
    a = augmented_view(photo, cfg, level, 7)
    assert a.shape == (3, 48, 48) and a.dtype == np.float32
    assert np.array_equal(a, augmented_view(photo, cfg, level, 7))
    others = [augmented_view(photo, cfg, level, s) for s in (8, 9, 10)]
    assert all(not np.array_equal(a, o) for o in others)


def test_strong_augmentation_leaves_torch_global_rng_alone(photo):
    state = torch.get_rng_state()
    augmented_view(photo, PreprocessConfig(input_size=48), "strong", 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_no_augmentation_is_the_eval_transform(photo):
    cfg = PreprocessConfig(input_size=48)
    expected = eval_transform(photo, cfg)
    for seed in (0, 1):
        assert np.array_equal(augmented_view(photo, cfg, "none", seed), expected)


@pytest.mark.parametrize("level", ["heavy", "", "Light", None])
def test_unknown_augmentation_level_is_refused(photo, level):
    with pytest.raises(ValueError, match="augment must be one of"):
        augmented_view(photo, PreprocessConfig(input_size=48), level, 0)


@pytest.mark.parametrize("level", ["none", "light", "strong"])
def test_eight_bit_views_normalise_to_the_float_views_bit_for_bit(photo, level):
    cfg = PreprocessConfig(input_size=48)
    pixels = [augmented_pixels(photo, cfg, level, s) for s in (3, 4)]
    assert all(p.dtype == np.uint8 and p.shape == (3, 48, 48) and p.flags.c_contiguous for p in pixels)
    for seed, p in zip((3, 4), pixels):
        assert np.array_equal(normalize_pixels(p, cfg), augmented_view(photo, cfg, level, seed))
    # a batch of views [n, views, 3, H, W] normalises as each view alone does
    batch = np.stack(pixels)[None]
    assert np.array_equal(normalize_pixels(batch, cfg)[0, 1], augmented_view(photo, cfg, level, 4))


def _striped() -> Image.Image:
    """A grey square with one dark horizontal bar a quarter of the way down: a flip moves it, a turn stands it up."""
    arr = np.full((64, 64, 3), 200, np.uint8)
    arr[14:18, :] = 20
    return Image.fromarray(arr)


@pytest.mark.parametrize("level, upright", [("flips", False), ("turns", True)])
def test_flips_keep_lines_level_and_turns_stand_them_up(level, upright):
    cfg = PreprocessConfig(input_size=64, crop_pct=1.0)
    seen_rows, stood_up = set(), False
    for seed in range(40):
        grey = augmented_pixels(_striped(), cfg, level, seed)[0].astype(float)
        dark_rows, dark_cols = np.flatnonzero(grey.mean(1) < 120), np.flatnonzero(grey.mean(0) < 120)
        stood_up |= len(dark_cols) > 0
        if len(dark_rows):
            seen_rows.add("top" if dark_rows.mean() < 32 else "bottom")
    assert seen_rows == {"top", "bottom"}  # flipped top to bottom as well as left to right
    assert stood_up is upright  # 90-degree turns only with "turns"


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_flips_show_about_what_the_eval_view_shows(photo, monkeypatch, crop_pct):
    """Issue 26: with the standard view (a centre crop) the flips views took 90-100 % of the whole photo, a wider
    field at a smaller scale than the network was scored on, and every elpv epoch validated below the start."""
    from headstart.vision import augment

    seen = []
    real = augment._resized_crop_box
    monkeypatch.setattr(augment, "_resized_crop_box",
                        lambda *a, **k: seen.append(k["scale"]) or real(*a, **k))
    augmented_view(photo, PreprocessConfig(input_size=64, crop_pct=crop_pct), "flips", seed=1)
    share = crop_pct ** 2
    assert seen == [(pytest.approx(0.9 * share), pytest.approx(share))]
