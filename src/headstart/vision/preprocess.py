"""Preprocessing configuration that travels with a backbone's weights, and the eval transform built from it.

Kept free of torch so that predicting with an exported model never imports it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from headstart.data.imageio import decoded_rgb, is_decoded, load_rgb

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """timm-style pretrained config: resize the short side to size/crop_pct, centre-crop size, normalise.

    `native_size` > 0 adds a second view of the whole image at about the photos' own resolution (see
    `with_native_view`); the features of both views are concatenated. `orientations` n > 1: each view's features are
    the mean over the first n of `ORIENTATIONS`: all eight turns and mirror images, for photos whose label no turn
    changes (`train.oriented`); two, the view and its mirror image (a fine-tuned model, `train.stage2`)."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    native_size: int = 0
    orientations: int = 1

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        """Without `orientations` when it is 1: models and feature caches from before it keep their keys."""
        d = asdict(self)
        if self.orientations == 1:
            del d["orientations"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(
            input_size=int(d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            native_size=int(d.get("native_size", 0)),  # models saved before native views have none
            orientations=int(d.get("orientations", 1)),
        )


# The eight turns and mirror images of a square view (the dihedral group): (transposed, flipped upside down,
# flipped left-right), applied in that order to the last two axes of an array.
ORIENTATIONS = {
    "upright": (False, False, False), "hflip": (False, False, True), "vflip": (False, True, False),
    "rot180": (False, True, True), "transpose": (True, False, False), "rot90": (True, False, True),
    "rot270": (True, True, False), "transverse": (True, True, True),
}


def oriented(arr: np.ndarray, name: str) -> np.ndarray:
    """`arr` (..., H, W) turned or mirrored as `ORIENTATIONS[name]` says; H == W when it transposes."""
    transposed, upside_down, mirrored = ORIENTATIONS[name]
    out = np.swapaxes(arr, -1, -2) if transposed else arr
    out = out[..., ::-1, :] if upside_down else out
    return np.ascontiguousarray(out[..., ::-1] if mirrored else out)


VIEW_MULTIPLE = 32  # the network's total stride: sizes that divide evenly through every stage


def resize_and_crop(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize the short side to cfg.resize_size, then centre-crop cfg.input_size (timm's eval transform).

    Only the crop is ever resampled (Pillow's resize with a source box), so the work and memory are those of
    the output, whatever the image's shape: resizing a 10000x1 strip whole before cropping took 2.6 GiB."""
    w, h = img.size
    size = cfg.input_size
    scale = cfg.resize_size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) == (w, h):  # already at scale: a plain crop, nothing resampled
        return img.crop((left, top, left + size, top + size))
    # The crop's box in the source, mapped through the same per-axis scale the whole resize would use.
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), _RESAMPLE[cfg.interpolation], box=box)


def normalize(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> float32 CHW array, scaled to [0, 1] then normalised by the config's mean and std."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def eval_transform(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    return normalize(resize_and_crop(img, cfg), cfg)


def eval_views(img: Image.Image, cfg: PreprocessConfig) -> tuple[np.ndarray, ...]:
    """The standard view, and the native view when the config has one: the whole image, no crop."""
    if not cfg.native_size:
        return (eval_transform(img, cfg),)
    native = replace(cfg, input_size=cfg.native_size, crop_pct=1.0)
    return eval_transform(img, cfg), eval_transform(img, native)


def load_for_model(path, cfg: PreprocessConfig) -> np.ndarray:
    """Decode and preprocess one image into the float32 CHW array the model expects."""
    return eval_transform(load_rgb(path, cfg.resize_size), cfg)


def load_views(path, cfg: PreprocessConfig) -> tuple[np.ndarray, ...]:
    """Decode one image once and preprocess it into each of the config's views (see `eval_views`). `path` may
    also be an image already in memory (a PIL image or a uint8 array: `imageio.decoded_rgb`)."""
    img = decoded_rgb(path) if is_decoded(path) else load_rgb(path, cfg.resize_size)
    return eval_views(img, cfg)
