"""Preprocessing configuration that travels with a backbone's weights, and the eval transform built from it.

Kept free of torch so that predicting with an exported model never imports it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """timm-style pretrained config: resize the short side to size/crop_pct, centre-crop size, normalise."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(
            input_size=int(d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )


def resize_and_crop(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize the short side to cfg.resize_size, then centre-crop cfg.input_size (timm's eval transform)."""
    w, h = img.size
    scale = cfg.resize_size / min(w, h)
    new_w, new_h = max(cfg.input_size, round(w * scale)), max(cfg.input_size, round(h * scale))
    img = img.resize((new_w, new_h), _RESAMPLE[cfg.interpolation])
    left, top = (new_w - cfg.input_size) // 2, (new_h - cfg.input_size) // 2
    return img.crop((left, top, left + cfg.input_size, top + cfg.input_size))


def normalize(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """RGB PIL image -> float32 CHW array, scaled to [0, 1] then normalised by the config's mean and std."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def eval_transform(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    return normalize(resize_and_crop(img, cfg), cfg)
