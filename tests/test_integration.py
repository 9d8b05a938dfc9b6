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
