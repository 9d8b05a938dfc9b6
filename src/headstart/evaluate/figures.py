"""Figures for evaluation reports.

matplotlib is imported inside the functions: it takes a noticeable fraction of a second to
import and only report generation needs it. Figures are built on an explicit Agg canvas
rather than through pyplot, so nothing here touches pyplot's global figure registry or the
process-wide backend choice.
"""

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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

    # Scale the canvas with the class count so each cell keeps room for two lines of text;
    # shrink fonts gently as cells get smaller.
    side = float(np.clip(1.5 + 0.6 * k, 4.5, 16.0))
    cell_font = float(np.clip(13.0 - 0.35 * k, 6.0, 11.0))
    label_font = float(np.clip(12.0 - 0.25 * k, 7.0, 10.0))
    labels = [_short(str(c)) for c in classes]
    rotate = k > 6 or max(len(s) for s in labels) > 8

    fig = Figure(figsize=(side + 1.2, side), dpi=120)
    FigureCanvasAgg(fig)  # attaches itself to fig as fig.canvas
    ax = fig.add_subplot()
    image = ax.imshow(colour_values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    cbar.ax.tick_params(labelsize=label_font)
    if normalize:
        cbar.set_label("fraction of true class", fontsize=label_font)

    ax.set_xticks(np.arange(k))
    ax.set_yticks(np.arange(k))
    ax.set_xticklabels(
        labels,
        fontsize=label_font,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor",
    )
    ax.set_yticklabels(labels, fontsize=label_font)
    ax.set_xlabel("Predicted", fontsize=label_font + 1)
    ax.set_ylabel("True", fontsize=label_font + 1)
    ax.set_title(title, fontsize=label_font + 2)
    # Thin white grid between cells keeps neighbouring same-colour cells distinguishable.
    ax.set_xticks(np.arange(k + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(k + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)

    if k <= _MAX_ANNOTATED:
        for i in range(k):
            for j in range(k):
                text = f"{counts[i, j]}\n{rates[i, j]:.1%}" if normalize else f"{counts[i, j]}"
                # White text on dark cells, black on light ones.
                colour = "white" if colour_values[i, j] > 0.55 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=cell_font, linespacing=1.1)

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
