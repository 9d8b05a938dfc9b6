"""ImageClassifier under scikit-learn's conventions: its own estimator checks, clone, GridSearchCV over image paths,
and images already in memory (PIL, uint8 arrays) predicted like the files they came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_cli import assert_one_line
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE
from headstart import ImageClassifier
from headstart.api import labelled_files
from headstart.errors import DataError

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone, is_classifier  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.utils import estimator_checks as checks  # noqa: E402
from sklearn.utils.validation import check_is_fitted  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402


@pytest.fixture
def make_clf(tiny_weights, tiny_cache):
    def make(**kwargs) -> ImageClassifier:
        return ImageClassifier(TINY_BACKBONE, weights=tiny_weights, **{"epochs": 8, "device": "cpu", "cv": 0,
                                                                       **kwargs})

    return make


@pytest.fixture
def png_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "png", per_class=4, fmt="png")


@pytest.mark.parametrize("check", [
    checks.check_get_params_invariance, checks.check_set_params, checks.check_no_attributes_set_in_init,
    checks.check_parameters_default_constructible, checks.check_estimator_cloneable, checks.check_estimator_repr,
    checks.check_estimator_tags_renamed, checks.check_valid_tag_types,
    checks.check_do_not_raise_errors_in_init_or_set_params,
])
def test_scikit_learns_own_estimator_checks(check):
    check("ImageClassifier", ImageClassifier())


def test_is_a_classifier_with_a_repr_of_what_changed_and_clones():
    clf = ImageClassifier(epochs=5, hidden=[8], strategy="head")
    assert is_classifier(clf)
    assert repr(ImageClassifier()) == "ImageClassifier()"
    assert repr(clf) == "ImageClassifier(hidden=[8], epochs=5, strategy='head')"
    twin = clone(clf)
    assert twin is not clf and twin.get_params() == clf.get_params() and repr(twin) == repr(clf)
    assert twin.set_params(**clf.get_params()).get_params() == clf.get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(clf)
    with pytest.raises(ValueError) as err:  # scikit-learn expects ValueError for an unknown parameter
        clf.set_params(learning_rate=1)
    assert_one_line(str(err.value), "learning_rate")


def test_grid_search_over_image_paths_and_a_manifest(make_clf, tmp_path):
    folder = make_image_folder(tmp_path / "photos", per_class=6)
    X, y = labelled_files(folder)
    assert len(X) == 18 and sorted(set(y)) == ["cat", "dog", "fish"]
    search = GridSearchCV(make_clf(val_split=0.2), {"dropout": [0.0, 0.5]}, cv=3, error_score="raise")
    search.fit(X, y)
    assert set(search.cv_results_["param_dropout"]) == {0.0, 0.5}
    assert search.best_estimator_.classes_ == ["cat", "dog", "fish"]
    assert search.best_estimator_.report_.source.kind == "files"
    assert 0.0 <= search.best_score_ <= 1.0 and search.score(X, y) >= 0.8
    # A manifest gives the same X and y, rows in file order (labels as written, paths resolved against it).
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in zip(X, y)))
    assert labelled_files(manifest) == (X, y)


def test_fit_on_paths_and_labels_scores_them(make_clf, tmp_path):
    folder = make_image_folder(tmp_path / "photos", per_class=5)
    X, y = labelled_files(folder)
    clf = make_clf().fit(X, y)
    assert clf.classes_ == ["cat", "dog", "fish"]
    assert clf.score(X, y) == pytest.approx(np.mean([p == t for p, t in zip(clf.predict(X), y)]))
    assert clf.score(X, y) == pytest.approx(clf.score(folder))
    with pytest.raises(DataError) as err:
        make_clf().fit(X, y[:-1])
    assert_one_line(str(err.value), "labels")
    with pytest.raises(DataError) as err:
        make_clf().fit(X)
    assert_one_line(str(err.value), "labels")


def test_images_in_memory_predict_like_their_files(make_clf, png_folder):
    clf = make_clf().fit(png_folder)
    files = sorted(png_folder.rglob("*.png"))
    from_files = clf.predict_proba(files)
    pil = [Image.open(f) for f in files]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    np.testing.assert_allclose(clf.predict_proba(pil), from_files, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(arrays), from_files, atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(np.stack(arrays)), from_files, atol=1e-6)  # a 4-D batch
    np.testing.assert_allclose(clf.predict_proba(arrays[3]), from_files[3:4], atol=1e-6)  # a lone array
    # Mixed with paths and folders, rows stay in input order; other modes convert as a file's would.
    mixed = [files[0], pil[5], png_folder / "cat", arrays[7], Image.open(files[2]).convert("RGBA")]
    cats = sorted((png_folder / "cat").glob("*.png"))
    expected = np.concatenate([from_files[[0, 5]], clf.predict_proba(cats), from_files[[7, 2]]])
    np.testing.assert_allclose(clf.predict_proba(mixed), expected, atol=1e-6)
    assert clf.predict(mixed) == [clf.classes_[i] for i in expected.argmax(1)]


def test_images_in_memory_predict_like_their_files_from_model_onnx(make_clf, png_folder, tmp_path):
    from headstart.serve.export import export_model

    clf = make_clf().fit(png_folder)
    clf.save(tmp_path / "model")
    export_model(tmp_path / "model", data=png_folder)
    loaded = ImageClassifier.load(tmp_path / "model", device="cpu")
    assert loaded._export is not None  # predictions come from model.onnx
    files = sorted(png_folder.rglob("*.png"))[:5]
    np.testing.assert_allclose(loaded.predict_proba([Image.open(f) for f in files]), loaded.predict_proba(files),
                               atol=1e-6)


@pytest.mark.parametrize("bad, needle", [
    (np.zeros((32, 32, 3), np.float32), "uint8"), (np.zeros((32, 32, 4), np.uint8), "(H, W, 3)"),
    (np.zeros((1, 5000), np.uint8), "too thin"),
])
def test_an_unusable_array_is_one_clear_line(make_clf, png_folder, bad, needle):
    clf = make_clf(epochs=2).fit(png_folder)
    with pytest.raises(DataError) as err:
        clf.predict_proba([sorted(png_folder.rglob("*.png"))[0], bad])
    assert_one_line(str(err.value), needle, "image 1 of those given in memory")
