"""Figures for evaluation reports: the confusion-matrix PNG `train` and `evaluate` write, drawn with Pillow."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["save_confusion_png"]

_MAX_LABEL_CHARS = 24  # longer class names are elided so they cannot squeeze the matrix
_MAX_ANNOTATED = 30  # beyond this, cell text is unreadable at any sensible figure size


def _short(name: str) -> str:
    return name if len(name) <= _MAX_LABEL_CHARS else name[: _MAX_LABEL_CHARS - 1] + "\u2026"


def save_confusion_png(
    confusion: np.ndarray,
    classes: Sequence[str],
    path: Path,
    title: str = "Confusion matrix",
    normalize: bool = True,
) -> Path:
    """Render a confusion matrix (rows true, columns predicted) to a PNG and return its path.

    With normalize, cells are coloured by the row-normalised rate (recall along the diagonal)
    and annotated "count\\nxx.x%"; this keeps rare classes as visible as common ones. Without
    it, cells are coloured and annotated by raw counts. Parent directories are created.
    """
    cm = np.asarray(confusion)
    k = len(classes)
    if cm.ndim != 2 or cm.shape != (k, k):
        raise ValueError(f"confusion must be [{k}, {k}] for {k} classes, got shape {cm.shape}")
    if k == 0:
        raise ValueError("cannot plot a confusion matrix with no classes")
    counts = cm.astype(np.int64)
    path = Path(path)

    # Row-normalised rates; rows with no true samples stay 0 instead of 0/0 = NaN (rendered blank).
    row_sums = counts.sum(axis=1, keepdims=True)
    rates = np.zeros(counts.shape, dtype=np.float64)
    np.divide(counts, row_sums, out=rates, where=row_sums > 0)
    if normalize:
        colour_values, vmax = rates, 1.0
    else:
        colour_values, vmax = counts.astype(np.float64), max(float(counts.max()), 1.0)
    texts = [[f"{counts[i, j]}\n{rates[i, j]:.1%}" if normalize else f"{counts[i, j]}" for j in range(k)]
             for i in range(k)] if k <= _MAX_ANNOTATED else None
    image = _draw_matrix(colour_values / vmax, [_short(str(c)) for c in classes], texts, title,
                         "fraction of true class" if normalize else "count", vmax)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)
    return path


# matplotlib's "Blues" (ColorBrewer's nine steps, linearly interpolated), the map this figure has always used.
_BLUES = np.array([(247, 251, 255), (222, 235, 247), (198, 219, 239), (158, 202, 225), (107, 174, 214),
                   (66, 146, 198), (33, 113, 181), (8, 81, 156), (8, 48, 107)], np.float64)


def _blue(v: float) -> tuple[int, int, int]:
    x = float(np.clip(v, 0.0, 1.0)) * (len(_BLUES) - 1)
    i = min(int(x), len(_BLUES) - 2)
    return tuple(int(round(c)) for c in _BLUES[i] + (x - i) * (_BLUES[i + 1] - _BLUES[i]))


def _draw_matrix(values: np.ndarray, labels: list[str], texts: list[list[str]] | None, title: str, bar_label: str,
                 vmax: float):
    """The figure with Pillow (matplotlib's import and layout cost ~0.4 s of every `train`): cells coloured by
    `values` in [0, 1], white text on dark cells, class names on both axes (the column names turned 45 degrees
    when long or many), and a colour bar from 0 to `vmax`."""
    from PIL import Image, ImageDraw, ImageFont

    k = len(labels)
    cell = int(np.clip(600 / k + 10, 34, 110))
    font = ImageFont.load_default(size=int(np.clip(cell * 0.2, 9, 15)))
    label_font = ImageFont.load_default(size=int(np.clip(16 - 0.3 * k, 9, 14)))
    rotate = k > 6 or max(len(s) for s in labels) > 8
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textlength(s, font=label_font) for s in labels)
    left = int(text_w) + 50
    below = int(text_w * 0.75) + 45 if rotate else 45
    side = cell * k
    width, height = left + side + 130, 50 + side + below
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left + side / 2, 20), title, fill="black", font=label_font, anchor="mm")
    for i in range(k):
        for j in range(k):
            x, y = left + j * cell, 50 + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_blue(values[i, j]), outline="white")
            if texts is not None:
                colour = "white" if values[i, j] > 0.55 else "black"
                draw.multiline_text((x + cell / 2, y + cell / 2), texts[i][j], fill=colour, font=font,
                                    anchor="mm", align="center", spacing=2)
        draw.text((left - 6, 50 + i * cell + cell / 2), labels[i], fill="black", font=label_font, anchor="rm")
    for j, name in enumerate(labels):
        cx = left + j * cell + cell / 2
        if not rotate:
            draw.text((cx, 56 + side), name, fill="black", font=label_font, anchor="mt")
            continue
        w = int(probe.textlength(name, font=label_font)) + 4
        strip = Image.new("RGBA", (w, 20), (255, 255, 255, 0))
        ImageDraw.Draw(strip).text((w, 10), name, fill="black", font=label_font, anchor="rm")
        turned = strip.rotate(45, expand=True, resample=Image.BICUBIC)
        img.paste(turned, (int(cx - turned.width + 8), 52 + side), turned)
    draw.text((left + side / 2, height - 14), "Predicted", fill="black", font=label_font, anchor="mm")
    turned = Image.new("RGBA", (60, 20), (255, 255, 255, 0))
    ImageDraw.Draw(turned).text((30, 10), "True", fill="black", font=label_font, anchor="mm")
    turned = turned.rotate(90, expand=True)
    img.paste(turned, (6, 50 + side // 2 - 30), turned)
    _colour_bar(draw, img, left + side + 24, 50, side, vmax, bar_label, label_font)
    return img


def _colour_bar(draw, img, x: int, top: int, height: int, vmax: float, label: str, font) -> None:
    from PIL import Image, ImageDraw

    for row in range(height):
        draw.line((x, top + row, x + 16, top + row), fill=_blue(1 - row / max(1, height - 1)))
    draw.rectangle((x, top, x + 16, top + height), outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + height - frac * height
        value = frac * vmax
        draw.line((x + 16, y, x + 20, y), fill="black")
        draw.text((x + 23, y), f"{value:.2f}" if vmax <= 1 else f"{value:.0f}", fill="black", font=font, anchor="lm")
    strip = Image.new("RGBA", (height, 20), (255, 255, 255, 0))
    ImageDraw.Draw(strip).text((height / 2, 10), label, fill="black", font=font, anchor="mm")
    turned = strip.rotate(90, expand=True)
    img.paste(turned, (x + 62, top), turned)
