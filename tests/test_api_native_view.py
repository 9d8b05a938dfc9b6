"""ImageClassifier on a backbone declared any-size (the any_size_clf fixture in conftest): small photos get a
native view that travels with the saved model, large ones do not, and fine-tuning runs at the photos' own size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE
from headstart.vision.preprocess import PreprocessConfig


def test_small_photos_get_a_native_view_that_travels_with_the_model(any_size_clf, tmp_path: Path) -> None:
    from headstart import ImageClassifier

    photos = make_image_folder(tmp_path / "photos", per_class=6, size=(64, 48))  # short side 48: 30% of 160 px
    clf = any_size_clf().fit(photos)
    assert clf.decision_.native_size == 64 and clf.frozen_.spec.preprocess.native_size == 64
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
    assert tuned.frozen_.upright().spec.preprocess == _tiny_preprocess()  # the mirror is validation's choice


def test_fine_tuning_runs_the_network_at_the_photos_own_size(any_size_clf, tmp_path: Path) -> None:
    from headstart import ImageClassifier

    small = make_image_folder(tmp_path / "small", per_class=4, size=(64, 48))  # short side 48: 30% of 160 px
    tuned = any_size_clf(epochs=2, strategy="finetune", finetune_epochs=1, views=1).fit(small)
    pre = tuned.frozen_.spec.preprocess
    assert (pre.input_size, pre.crop_pct, pre.native_size) == (64, 1.0, 0)  # one view: the whole photo
    assert tuned.decision_.native_input == 64
    assert tuned.decision_.stage2.config.unfreeze == "all"  # at its own size, every stage is affordable
    tuned.save(tmp_path / "model")
    loaded = ImageClassifier.load(tmp_path / "model", device="cpu")
    assert loaded.frozen_.spec.preprocess == pre
    images = sorted(small.rglob("*.jpg"))
    np.testing.assert_allclose(loaded.predict_proba(images), tuned.predict_proba(images), atol=1e-5)
    kept_size = any_size_clf(epochs=2, strategy="finetune", finetune_epochs=1, views=1, native_view=False).fit(small)
    assert kept_size.frozen_.upright().spec.preprocess == _tiny_preprocess()
