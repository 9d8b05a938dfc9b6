"""Defects a new user met on the README's path (issue 24), each pinned by a test that failed before its fix:
relative output paths, file modes under the user's umask, int8 models exported as int8, commands that read the
feature cache resolving the engine as `train` does."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_an_atomic_write_to_a_relative_path_lands(tmp_path: Path, monkeypatch) -> None:
    # `headstart train photos/ --out model/` wrote model/report.html through a relative path: mkstemp's absolute
    # temporary name did not compare equal to the relative target's folder, and the run ended in a traceback.
    from headstart.paths import atomic_path, atomic_write_bytes

    monkeypatch.chdir(tmp_path)
    atomic_write_bytes(Path("model/report.html"), b"<html></html>")
    assert (tmp_path / "model" / "report.html").read_bytes() == b"<html></html>"
    with atomic_path(Path("model") / "x.bin") as tmp:
        assert not tmp.is_absolute() and tmp.parent == Path("model")
        tmp.write_bytes(b"1")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["report.html", "x.bin"]


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_get_the_users_umask(tmp_path: Path, mask: int, want: int) -> None:
    from headstart.paths import atomic_path, atomic_write_bytes

    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        with atomic_path(tmp_path / "b.bin") as tmp:  # a writer that replaces the file, as safetensors does
            tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == want and _mode(tmp_path / "b.bin") == want


def test_a_saved_model_and_its_cache_are_readable_by_others(tmp_path: Path, tiny_cache: Path, tiny_weights: Path,
                                                           umask_022, monkeypatch) -> None:
    from headstart import ImageClassifier

    photos = make_image_folder(tmp_path / "photos", per_class=6)
    monkeypatch.chdir(tmp_path)
    ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=2, device="cpu").fit("photos").save("model")
    written = [p for p in (tmp_path / "model").rglob("*") if p.is_file()]
    written += [p for p in tiny_cache.rglob("*") if p.is_file() and "features" in p.parts]
    assert any(p.name == "model.safetensors" for p in written) and len(written) > 3
    assert {p.name: oct(_mode(p)) for p in written if _mode(p) != 0o644} == {}
    assert photos.exists()


@pytest.fixture
def int8_model(tmp_path: Path, tiny_cache: Path, tiny_weights: Path) -> tuple[Path, Path]:
    """A tiny model trained with the int8 engine (what `auto` picks on a VNNI CPU), and its photos."""
    from headstart import ImageClassifier

    photos = make_image_folder(tmp_path / "photos", per_class=8, size=(96, 80), seed=5)
    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=4, device="cpu", engine="int8")
    clf.fit(photos).save(tmp_path / "model")
    return tmp_path / "model", photos


def test_an_int8_model_exports_int8_and_predicts_the_same_after(int8_model: tuple[Path, Path]) -> None:
    # After `headstart export`, predict and evaluate read model.onnx: a float32 export of an int8-trained model
    # changed 9 of 153 hymenoptera labels. The export is the model's own int8 graph, with the same answers.
    from headstart import ImageClassifier
    from headstart.serve.export import export_model
    from headstart.serve.onnx_predictor import OnnxPredictor

    model, photos = int8_model
    paths = sorted(photos.rglob("*.jpg"))
    before = ImageClassifier.load(model).predict_proba(paths)
    report = export_model(model, photos)
    assert report.quantization == "int8" and report.parity.max_dprob < 1e-4
    meta_quant = OnnxPredictor(model / "model.onnx").info.quantization
    assert meta_quant.startswith("int8")
    after = ImageClassifier.load(model).predict_proba(paths)
    assert ImageClassifier.load(model)._export is not None  # predict really went through model.onnx
    np.testing.assert_allclose(after, before, atol=1e-4)


def test_an_int8_model_records_its_engine(int8_model: tuple[Path, Path]) -> None:
    import json

    model, _ = int8_model
    assert json.loads((model / "headstart.json").read_text())["params"]["engine"] == "int8"


def test_check_after_an_int8_train_finds_its_features(tmp_path: Path, tiny_cache: Path, tiny_weights: Path) -> None:
    # `headstart check photos/` right after `headstart train photos/` said "features are not cached": train had
    # cached int8 features (what auto picks on a VNNI CPU), check looked for float32's.
    from headstart import ImageClassifier
    from headstart.tasks.check import check_folder

    photos = make_image_folder(tmp_path / "photos", per_class=8, size=(96, 80), seed=6)
    ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=2, device="cpu", engine="int8").fit(photos)
    report = check_folder(photos, backbone=TINY_BACKBONE, weights=tiny_weights, device="cpu", engine="int8")
    assert report.backbone == TINY_BACKBONE, report.notes
    assert not [n for n in report.notes if "not cached" in n]


def test_a_report_shows_names_that_are_not_utf8(tmp_path: Path, tiny_cache: Path, tiny_weights: Path) -> None:
    # A photo named with a Latin-1 byte reached the report's gallery and ended the run in UnicodeEncodeError.
    from headstart import ImageClassifier
    from headstart.tasks.report_train import write_train_report

    photos = make_image_folder(tmp_path / "photos", per_class=6, seed=7)
    for path in sorted((photos / "cat").iterdir()):
        os.rename(os.fsencode(path), os.fsencode(path.parent) + b"/caf\xe9-" + os.fsencode(path.name))
    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=2, device="cpu").fit(photos)
    page = write_train_report(clf, tmp_path / "model", photos).read_text(encoding="utf-8")
    assert "caf\\xe9-" in page
