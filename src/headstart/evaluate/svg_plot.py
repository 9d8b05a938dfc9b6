"""Line charts as SVG text, for the report's learning curves and reliability diagram.

Not matplotlib: importing it and drawing the two charts cost ~0.25 s of every `train` (its report), a tenth of
what training does besides extraction on flowers. A chart here is lines, markers, ticks and a legend on linear
axes: what those two figures need, and vector, so they stay sharp at any zoom.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

COLOURS = {"blue": "#1f77b4", "orange": "#ff7f0e", "green": "#2ca02c", "red": "#d62728", "grey": "#7f7f7f"}


@dataclass(frozen=True)
class Line:
    xs: Sequence[float]
    ys: Sequence[float]
    label: str
    colour: str = "blue"
    dashed: bool = False
    markers: bool = False
    right: bool = False  # against the right-hand axis


@dataclass
class Panel:
    """One set of axes: lines against a left (and optionally a right) y-axis, vertical marks at some x."""

    title: str
    x_label: str
    y_label: str = ""
    lines: list[Line] = field(default_factory=list)
    x_range: tuple[float, float] | None = None
    y_range: tuple[float, float] | None = None
    right_label: str = ""
    right_range: tuple[float, float] | None = None
    vlines: list[tuple[float, str]] = field(default_factory=list)  # (x, legend label), dotted grey


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values within [lo, hi], 1, 2 or 5 times a power of ten apart: the spacing whose count comes
    closest to `n` (the wider spacing on a tie)."""
    if not hi > lo:
        return [lo]
    base = 10 ** math.floor(math.log10((hi - lo) / n))
    best: list[float] = []
    for step in (base * m for m in (1, 2, 5, 10, 20)):
        first = math.ceil(lo / step - 1e-9) * step
        found = [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]
        if not best or abs(len(found) - n) <= abs(len(best) - n):
            best = found
    return best


def _span(values: list[float], given: tuple[float, float] | None) -> tuple[float, float]:
    if given:
        return given
    finite = [v for v in values if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.05 or 0.5
    return lo - pad, hi + pad


def _label(v: float) -> str:
    return f"{v:g}"


def panel_svg(p: Panel, x0: float, width: float, height: float) -> str:
    """The panel's elements, its axes box `width` x `height` placed at x offset `x0` (top margin 30 px)."""
    left, top = x0 + 55, 30.0
    xr = _span([x for line in p.lines for x in line.xs] + [v for v, _ in p.vlines], p.x_range)
    yr = _span([y for line in p.lines if not line.right for y in line.ys], p.y_range)
    rr = _span([y for line in p.lines if line.right for y in line.ys], p.right_range)
    sx = lambda x: left + (x - xr[0]) / (xr[1] - xr[0]) * width  # noqa: E731
    sy = lambda y, r=yr: top + height - (y - r[0]) / (r[1] - r[0]) * height  # noqa: E731
    out = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#333"/>',
           f'<text x="{left + width / 2}" y="{top - 10}" text-anchor="middle" font-size="13">{html.escape(p.title)}</text>',
           f'<text x="{left + width / 2}" y="{top + height + 34}" text-anchor="middle">{html.escape(p.x_label)}</text>']
    for t in ticks(*xr):
        if xr[0] <= t <= xr[1]:
            out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + height}" y2="{top + height + 4}" '
                       f'stroke="#333"/><text x="{sx(t):.1f}" y="{top + height + 16}" text-anchor="middle">'
                       f'{_label(t)}</text>')
    axes = [(yr, left, -4, "end", p.y_label)] + ([(rr, left + width, 4, "start", p.right_label)]
                                               if any(line.right for line in p.lines) else [])
    for r, x, d, anchor, name in axes:
        for t in ticks(*r):
            if r[0] <= t <= r[1]:
                out.append(f'<line x1="{x}" x2="{x + d}" y1="{sy(t, r):.1f}" y2="{sy(t, r):.1f}" stroke="#333"/>'
                           f'<text x="{x + 2 * d}" y="{sy(t, r) + 4:.1f}" text-anchor="{anchor}">{_label(t)}</text>')
        if name:
            cx = x + 11 * d
            out.append(f'<text x="{cx}" y="{top + height / 2}" text-anchor="middle" '
                       f'transform="rotate(-90 {cx} {top + height / 2})">{html.escape(name)}</text>')
    for v, _ in p.vlines:
        out.append(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{top}" y2="{top + height}" stroke="#7f7f7f" '
                   f'stroke-dasharray="2 3"/>')
    for line in p.lines:
        r = rr if line.right else yr
        points = [(sx(x), sy(y, r)) for x, y in zip(line.xs, line.ys) if math.isfinite(y)]
        dash = ' stroke-dasharray="4 3"' if line.dashed else ""
        colour = COLOURS.get(line.colour, line.colour)
        pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.6"{dash}/>')
        if line.markers:
            out += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>' for px, py in points]
    entries = [(line.label, COLOURS.get(line.colour, line.colour), line.dashed) for line in p.lines]
    entries += [(name, COLOURS["grey"], True) for _, name in p.vlines]
    out.append(f'<rect x="{left + width - 123}" y="{top + 3}" width="120" height="{15 * len(entries) + 4}" '
               f'fill="white" fill-opacity="0.85" stroke="#ccc"/>')
    for i, (name, colour, dashed) in enumerate(entries):
        y = top + 14 + 15 * i
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<line x1="{left + width - 118}" x2="{left + width - 98}" y1="{y - 4}" y2="{y - 4}" '
                   f'stroke="{colour}" stroke-width="1.6"{dash}/><text x="{left + width - 93}" y="{y}">'
                   f'{html.escape(name)}</text>')
    return "".join(out)


def chart_uri(panels: list[Panel], width: float = 380, height: float = 230) -> str:
    """The panels side by side as one SVG, as a data: URI for an <img>."""
    slot = width + 120
    body = "".join(panel_svg(p, i * slot, width, height) for i, p in enumerate(panels))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{slot * len(panels)}" height="{height + 75}" '
           f'font-family="DejaVu Sans, Arial, sans-serif" font-size="11"><rect width="100%" height="100%" '
           f'fill="white"/>{body}</svg>')
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode()
