"""Tests for headstart.evaluate.figures: the confusion-matrix PNG, and importing metrics/figures does not import
matplotlib."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headstart.evaluate.figures import save_confusion_png


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> tuple[int, int]:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


@pytest.mark.parametrize("n_classes", [2, 5, 20])
@pytest.mark.parametrize("normalize", [True, False])
def test_save_confusion_png_writes_valid_png(tmp_path, n_classes, normalize):
    rng = np.random.default_rng(n_classes)
    cm = rng.integers(0, 50, size=(n_classes, n_classes))
    classes = [f"class_{i}" for i in range(n_classes)]
    out = tmp_path / "nested" / "cm.png"  # parent is created on demand
    result = save_confusion_png(cm, classes, out, title="Validation", normalize=normalize)
    assert result == out
    width, height = _check_png(out)
    assert 300 <= width <= 3000 and 300 <= height <= 3000


def test_save_confusion_png_handles_empty_rows_without_warnings(tmp_path, no_warnings):
    cm = np.array([[3, 1, 0], [0, 0, 0], [1, 0, 4]])  # class "b" has no true samples
    out = save_confusion_png(cm, ["a", "b", "a very long class name indeed, longer than most"], tmp_path / "cm.png")
    _check_png(out)


def test_save_confusion_png_rejects_shape_mismatch(tmp_path):
    with pytest.raises(ValueError):
        save_confusion_png(np.zeros((3, 3)), ["a", "b"], tmp_path / "cm.png")


def test_the_figures_train_draws_do_not_import_matplotlib(tmp_path):
    # The confusion PNG (Pillow) and the report's charts (SVG): importing matplotlib and drawing them with it
    # cost ~0.5 s of every `train`. (Grad-CAM's colour map, for `headstart report`, still takes it.)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    code = (
        "import sys, numpy as np, headstart.evaluate.metrics, headstart.evaluate.figures; "
        "from headstart.tasks.report_html import _curves_uri; from headstart.records import History; "
        "headstart.evaluate.figures.save_confusion_png(np.eye(3, dtype=int), 'abc', sys.argv[1]); "
        "_curves_uri([('head', History([1.0, 0.5], [1.1, 0.7], [0.5, 0.8], 1))]); "
        "bad = [m for m in ('matplotlib',) if m in sys.modules]; "
        "sys.exit(f'imported: {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cm.png")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
