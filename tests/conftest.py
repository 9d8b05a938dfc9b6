"""Shared fixtures: tiny generated image datasets whose classes differ by dominant colour, each test's own cache,
and the tiny backbone's weights and exports made once a run.

Fixtures only: the plain helpers they use live in tests/helpers_*.py (images, models, cli, ...), which test files
import directly. Kept free of torch so data-only tests stay fast to collect.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers_images import make_image_folder
from helpers_models import N_STAGES, TINY_BACKBONE, seed_tiny_export


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


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty HEADSTART_CACHE, so no test reads or writes the user's cache or another's."""
    cache = tmp_path / "headstart-cache"
    monkeypatch.setenv("HEADSTART_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(autouse=True, scope="session")
def float32_by_default() -> Iterator[None]:
    """`--engine auto` means float32 in every test in this process, whatever this machine's CPU: it means int8 only
    where the CPU has VNNI (`device.int8_is_fast`), and tests whose figures were set with float32 features must not
    change with the machine CI draws. Session-wide, so that module-scoped fixtures train under it too; the int8
    tests (test_runtime_quantize.py) set it themselves."""
    from headstart.runtime import frozen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frozen, "int8_is_fast", lambda: False)
        yield


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
    return seed_tiny_export(tiny_onnx, isolated_cache)


@pytest.fixture(scope="session")
def lite0_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for every test of the real EfficientNet-Lite0, so its conversion and export happen once a run."""
    return tmp_path_factory.mktemp("lite0-cache")


@pytest.fixture
def lite0_cache(lite0_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEADSTART_CACHE", str(lite0_cache_dir))
    return lite0_cache_dir


# --- shared by several test files ----------------------------------------------------------------------------


@pytest.fixture
def no_warnings():
    """Turn any warning (e.g. numpy's 'invalid value in divide') into a test failure."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.fixture
def one_torch_thread():
    """torch's OpenMP threads spin-wait on each other: on a busy 2-core machine the tiny model's steps take ~300x
    longer with 2 threads than with 1. One thread keeps these tests fast whatever else runs beside them.
    Not autouse: the fine-tuning test files ask for it with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def frozen(tiny_weights: Path, tiny_cache: Path):
    """The tiny backbone, frozen, with its ONNX export already in this test's cache."""
    from headstart.backbones.registry import resolve
    from headstart.runtime.frozen import FrozenBackbone

    return FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights)


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    return sorted(make_image_folder(tmp_path / "photos", per_class=6).rglob("*.jpg"))


@pytest.fixture(scope="session")
def tiny_bottom(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny backbone's frozen bottom below stage 3 (what --unfreeze 2 caches), exported once per run."""
    from headstart.backbones.registry import resolve
    from headstart.cache.boundary import bottom_engine
    from headstart.runtime.frozen import FrozenBackbone

    root = tmp_path_factory.mktemp("tiny-bottom-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSTART_CACHE", str(root))
        frozen = FrozenBackbone.pretrained(resolve(TINY_BACKBONE), tiny_weights)
        bottom_engine(frozen.build_torch(), N_STAGES - 2, frozen.weights_id, resolve(TINY_BACKBONE).preprocess)
    (path,) = (root / "onnx").glob("bottom-*.onnx")
    return root, path.relative_to(root)


@pytest.fixture
def ft_cache(tiny_cache: Path, tiny_bottom: tuple[Path, Path]) -> Path:
    """This test's cache with the tiny backbone's full and bottom (boundary 3) ONNX exports already in it."""
    return seed_tiny_export(tiny_bottom, tiny_cache)


@pytest.fixture
def any_size_clf(tiny_weights, monkeypatch: pytest.MonkeyPatch):
    """The tiny backbone declared any-size, as the Lite family is: fit adds native views for small photos."""
    import dataclasses

    from headstart.train import pipeline

    real = pipeline.resolve
    monkeypatch.setattr(pipeline, "resolve", lambda name: dataclasses.replace(real(name), any_input_size=True))

    def make(**kwargs):
        from headstart import ImageClassifier

        return ImageClassifier(TINY_BACKBONE, weights=tiny_weights, **{"epochs": 8, "device": "cpu", **kwargs})

    return make
