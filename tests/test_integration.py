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


def test_training_a_head_on_the_cpu_never_imports_torch(lite0_cache, tmp_path):
    """With Lite0's ONNX exports cached (the first run makes them, with torch), a `fit` (scan, features, the head,
    its refit and temperature) and `save` run in numpy and ONNX Runtime: `import torch` took ~1.1 s of a ~17 s
    cold flowers train on 2 cores."""
    import subprocess
    import sys

    from helpers_images import make_image_folder

    ImageClassifier(epochs=2, engine="fp32").fit(make_image_folder(tmp_path / "warm", per_class=5, seed=1))
    data = make_image_folder(tmp_path / "photos", per_class=8, seed=2)  # other photos: their features extract
    code = ("import sys; from headstart import ImageClassifier; "
            "clf = ImageClassifier(epochs=3, engine='fp32').fit(sys.argv[1]); clf.save(sys.argv[2]); "
            "print(clf.cached_, clf.predict([sys.argv[3]])[0], 'torch' in sys.modules)")
    probe = sorted((data / "dog").iterdir())[0]
    proc = subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path / "m"), str(probe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cached, label, imported = proc.stdout.split()[-3:]
    assert cached == "0" and label in ("cat", "dog", "fish") and imported == "False"


FLOWERS = SHARED_DATA / "flowers"


@pytest.mark.skipif(not FLOWERS.is_dir(), reason=f"real data not found at {FLOWERS}")
def test_small_blurred_flowers_get_a_native_view(lite0_cache, tmp_path):
    photos = tmp_path / "flowers"
    for class_dir in sorted(FLOWERS.iterdir()):  # 40 photos a class keeps it quick; they are 128 px squares
        (photos / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:40]:
            (photos / class_dir.name / image.name).symlink_to(image)
    clf = ImageClassifier(strategy="head").fit(photos)  # the head's views (auto may fine-tune 160 photos)
    assert clf.frozen_.spec.preprocess.native_size == 128
    assert clf.head_config_.in_features == 2 * 1904 and clf.head_config_.hidden == ()  # 160 photos: linear
    assert clf.val_metrics_.accuracy >= 0.6  # 5 classes, 8 validation photos each: chance is 0.2
    clf.save(tmp_path / "model")
    loaded = ImageClassifier.load(tmp_path / "model")
    assert loaded.frozen_.spec.preprocess.native_size == 128
    assert loaded.evaluate(photos).metrics.accuracy == clf.evaluate(photos).metrics.accuracy
