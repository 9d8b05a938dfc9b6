"""Shared fixtures: tiny generated image datasets whose classes differ by dominant colour.

Kept free of torch so data-only tests stay fast to collect.
"""

from __future__ import annotations

import colorsys
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF"}
_BASE_COLOURS = [(220, 40, 40), (40, 190, 60), (40, 70, 220), (230, 210, 40), (200, 60, 200), (40, 200, 210)]


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class index; beyond the fixed palette, hues are spread by the golden ratio."""
    if index < len(_BASE_COLOURS):
        return _BASE_COLOURS[index]
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.8, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


def make_image(colour: Sequence[int], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A (width, height) RGB image: the colour plus per-pixel noise and a random darker blob, so no two are equal."""
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.float32)
    arr[:] = np.asarray(colour, dtype=np.float32) * rng.uniform(0.8, 1.1)
    arr += rng.normal(0.0, 18.0, size=arr.shape)
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    yy, xx = np.ogrid[:h, :w]
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < (min(w, h) // 4) ** 2
    arr[blob] *= 0.6
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_image_folder(
    root: Path | str,
    classes: Sequence[str] = ("cat", "dog", "fish"),
    per_class: int = 6,
    size: tuple[int, int] = (64, 48),
    fmt: str = "jpg",
    seed: int = 0,
) -> Path:
    """Write root/<class>/<class>_NNN.<fmt> images (per_class each) and return root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for index, cls in enumerate(classes):
        class_dir = root / cls
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = make_image(class_colour(index), size, rng)
            img.save(class_dir / f"{cls}_{i:03d}.{fmt}", _FORMATS[fmt.lower()])
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """photos/{cat,dog,fish}/ with 6 small JPEGs each."""
    return make_image_folder(tmp_path / "photos")


@pytest.fixture
def split_folder(tmp_path: Path) -> Path:
    """photos/train/{cat,dog,fish}/ (6 each) and photos/val/{cat,dog,fish}/ (2 each)."""
    root = tmp_path / "photos"
    make_image_folder(root / "train", per_class=6, seed=1)
    make_image_folder(root / "val", per_class=2, seed=2)
    return root


# --- caches and backbones ------------------------------------------------------------------------------------
# Nothing here imports torch at module level: torch-using fixtures import it when they run.

# Tests never reach the network. huggingface_hub reads this once, at import, so it is set before any test runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_BACKBONE = "test_efficientnet"  # timm's ~100k-parameter EfficientNet: 160 px input, conv_stem/blocks/conv_head


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty HEADSTART_CACHE, so no test reads or writes the user's cache or another's."""
    cache = tmp_path / "headstart-cache"
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random (seeded) weights for the tiny backbone, as a timm-layout safetensors file without classifier."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("tiny-weights") / f"{TINY_BACKBONE}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny backbone exported to ONNX once per run: (that export's cache root, the file's path inside it)."""
    from headstart.backbones.registry import resolve
    from headstart.runtime.export import onnx_path_for
    from headstart.runtime.frozen import FrozenBackbone

    root = tmp_path_factory.mktemp("tiny-export-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSTART_CACHE", str(root))
        frozen = FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights)
        frozen.engine("cpu")
        path = onnx_path_for(frozen.spec, frozen.weights_id)
    assert path.exists()
    return root, path.relative_to(root)


@pytest.fixture
def tiny_cache(isolated_cache: Path, tiny_onnx: tuple[Path, Path]) -> Path:
    """This test's own cache, seeded only with the tiny backbone's ONNX export (an immutable file keyed by the
    weights' fingerprint) so each test does not pay for an export; features and everything else start empty."""
    root, rel = tiny_onnx
    (isolated_cache / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / rel, isolated_cache / rel)
    return isolated_cache


@pytest.fixture(scope="session")
def lite0_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for every test of the real EfficientNet-Lite0, so its conversion and export happen once a run."""
    return tmp_path_factory.mktemp("lite0-cache")


@pytest.fixture
def lite0_cache(lite0_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEADSTART_CACHE", str(lite0_cache_dir))
    return lite0_cache_dir


def assert_one_line(message: str, *needles: str) -> str:
    assert message and "\n" not in message, repr(message)
    for needle in needles:
        assert needle in message, message
    return message
