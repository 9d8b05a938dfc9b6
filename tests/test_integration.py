"""The defaults on real photos: EfficientNet-Lite0 features and a trained head on hymenoptera (ants vs bees)."""

from __future__ import annotations

from pathlib import Path

import pytest

from headstart import ImageClassifier

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HYMENOPTERA = SHARED_DATA / "hymenoptera"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (HYMENOPTERA / "train").is_dir() or not (HYMENOPTERA / "val").is_dir(),
                       reason=f"real data not found at {HYMENOPTERA} (the shared data set beside the checkout)"),
]


def test_defaults_on_hymenoptera_beat_the_linear_probe(lite0_cache):
    clf = ImageClassifier()
    assert clf.backbone == "efficientnet_lite0"
    clf.fit(HYMENOPTERA / "train")
    assert clf.classes_ == ["ants", "bees"]
    assert clf.skipped_ == []
    assert clf.val_metrics_.accuracy >= 0.85  # the split carved from train/ for early stopping
    score = clf.score(HYMENOPTERA / "val")
    print(f"hymenoptera: val split {clf.val_metrics_.accuracy:.3f}, val/ {score:.3f}")
    assert score >= 0.95, f"val accuracy {score:.3f} < 0.95 (a linear probe on the same features gets 0.948)"


FLOWERS = SHARED_DATA / "flowers"


@pytest.mark.skipif(not FLOWERS.is_dir(), reason=f"real data not found at {FLOWERS}")
def test_small_blurred_flowers_get_a_native_view(lite0_cache, tmp_path):
    photos = tmp_path / "flowers"
    for class_dir in sorted(FLOWERS.iterdir()):  # 40 photos a class keeps it quick; they are 128 px squares
        (photos / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:40]:
            (photos / class_dir.name / image.name).symlink_to(image)
    clf = ImageClassifier().fit(photos)
    assert clf.frozen_.spec.preprocess.native_size == 128
    assert clf.head_config_.in_features == 2 * 1904 and clf.head_config_.hidden == ()  # 160 photos: linear
    assert clf.val_metrics_.accuracy >= 0.6  # 5 classes, 8 validation photos each: chance is 0.2
    clf.save(tmp_path / "model")
    loaded = ImageClassifier.load(tmp_path / "model")
    assert loaded.frozen_.spec.preprocess.native_size == 128
    assert loaded.evaluate(photos)[0].accuracy == clf.evaluate(photos)[0].accuracy
