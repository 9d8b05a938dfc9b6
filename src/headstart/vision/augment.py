"""Training-time augmentation for fine-tuning: random resized crop, flip, colour jitter; `strong` adds
TrivialAugment; `flips` keeps nearly the whole photo and flips it both ways (a crop would cut off a defect at the
edge), for photos without an up or a left (inspection images, cells, slides); `turns` adds 90-degree turns.
Built from a backbone's preprocessing config, like the eval transform.

Each view draws its parameters from its own seeded generator, so views decoded in parallel threads are
reproducible, and a resumed run recomputes exactly the views an uninterrupted one would have.

A view is 8-bit RGB until it is normalised: `augmented_pixels` returns it that way (CHW uint8), so a store of
views can keep a byte per value instead of a float16's two, and `normalize_pixels` turns stored views into
exactly the float32 arrays `augmented_view` returns.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from PIL import Image

from headstart.vision.preprocess import PreprocessConfig, normalize, resize_and_crop

LEVELS = ("none", "light", "strong", "flips", "turns")
_TRIVIAL_LOCK = threading.Lock()  # TrivialAugment draws from torch's global RNG: one view at a time


def view_seed(seed: int, image_index: int, view: int) -> int:
    return (seed * 1_000_003 + image_index) * 97 + view


def augmented_view(img: Image.Image, cfg: PreprocessConfig, level: str, seed: int) -> np.ndarray:
    """One augmented, normalised CHW float32 view of `img`."""
    return normalize(_augmented_image(img, cfg, level, seed), cfg)


def augmented_pixels(img: Image.Image, cfg: PreprocessConfig, level: str, seed: int) -> np.ndarray:
    """The same view as `augmented_view`, before normalisation: CHW uint8."""
    return np.ascontiguousarray(np.asarray(_augmented_image(img, cfg, level, seed), dtype=np.uint8).transpose(2, 0, 1))


def normalize_pixels(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 views [..., 3, H, W] -> float32, with `normalize`'s arithmetic in its order, so the result is the same
    to the bit as normalising the image they came from."""
    shape = (3, 1, 1)
    arr = np.asarray(pixels, dtype=np.float32) * (1.0 / 255.0)
    return (arr - np.asarray(cfg.mean, np.float32).reshape(shape)) / np.asarray(cfg.std, np.float32).reshape(shape)


def _augmented_image(img: Image.Image, cfg: PreprocessConfig, level: str, seed: int) -> Image.Image:
    if level not in LEVELS:
        raise ValueError(f"augment must be one of {LEVELS}, not {level!r}")
    from torchvision.transforms.v2 import functional as F

    if level == "none":
        return resize_and_crop(img, cfg)
    rng = np.random.default_rng(seed)
    size = cfg.input_size
    if level in ("flips", "turns"):
        return _turned(img, cfg, rng, _TURNS if level == "turns" else _TURNS[:4])

    top, left, h, w = _resized_crop_box(img.width, img.height, rng, scale=(0.35, 1.0))
    # torchvision's resized_crop copies the crop (up to the whole photo) before resizing it; Pillow's resize
    # with a source box reads the crop in place, so a view costs the memory of the output only.
    out = img.resize((size, size), _resample(cfg), box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        out = F.horizontal_flip(out)
    out = F.adjust_brightness(out, rng.uniform(0.7, 1.3))
    out = F.adjust_contrast(out, rng.uniform(0.7, 1.3))
    out = F.adjust_saturation(out, rng.uniform(0.7, 1.3))
    out = F.adjust_hue(out, rng.uniform(-0.03, 0.03))
    if level == "strong":
        out = _trivial_augment(out, int(rng.integers(2**31)))
    return out


# Transpose ops that, with the identity, make the 8 symmetries of the square; the first 4 keep a horizontal line
# horizontal (flips both ways), the others turn it upright.
_TURNS = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180,
          Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
          Image.Transpose.TRANSVERSE)


# Bumped when `_turned`'s views change, so that a boundary store of the older views is not reused.
TURNED_RECIPE = 2


def _turned(img: Image.Image, cfg: PreprocessConfig, rng: np.random.Generator, turns: tuple) -> Image.Image:
    """Nearly what the eval view sees (90-100 % of its area: all of the photo for a whole view, the centre crop's
    share of it for a cropped one), in one of `turns`, with brightness and contrast jitter: no colour jitter,
    which means nothing to grayscale.

    Recipe 1 took 90-100 % of the whole photo whatever the eval view: at the standard view (a 224 px centre crop
    of the photo resized to 256) the network trained on a wider field at a smaller scale than it was scored on,
    and on elpv every epoch scored below the start (validation balanced accuracy 0.62 -> 0.42-0.51)."""
    from torchvision.transforms.v2 import functional as F

    size = cfg.input_size
    share = min(1.0, cfg.crop_pct) ** 2
    top, left, h, w = _resized_crop_box(img.width, img.height, rng, scale=(0.9 * share, share),
                                        ratio=(0.95, 1 / 0.95))
    out = img.resize((size, size), _resample(cfg), box=(left, top, left + w, top + h))
    turn = turns[int(rng.integers(len(turns)))]
    out = out.transpose(turn) if turn is not None else out
    out = F.adjust_brightness(out, rng.uniform(0.8, 1.2))
    return F.adjust_contrast(out, rng.uniform(0.8, 1.2))


def _resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box, drawn from our generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(width, height)  # fall back to a centre crop
    return (height - side) // 2, (width - side) // 2, side, side


def _resample(cfg: PreprocessConfig) -> Image.Resampling:
    return {"bilinear": Image.Resampling.BILINEAR}.get(cfg.interpolation, Image.Resampling.BICUBIC)


def _trivial_augment(img: Image.Image, seed: int) -> Image.Image:
    import torch
    from torchvision.transforms import TrivialAugmentWide

    with _TRIVIAL_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TrivialAugmentWide()(img)
