"""evaluate.svg_plot: round ticks inside the range, and charts that are well-formed SVG with a line per series."""

from __future__ import annotations

import base64
import math
import xml.etree.ElementTree as ET

import pytest

from headstart.evaluate.svg_plot import Line, Panel, chart_uri, ticks


@pytest.mark.parametrize("lo,hi", [(0.51, 1.5), (0.0, 1.02), (1, 20), (0.0001, 0.0009), (-3.2, 7.9), (0.9, 60)])
def test_ticks_are_round_evenly_spaced_and_inside_the_range(lo, hi):
    got = ticks(lo, hi)
    assert 3 <= len(got) <= 8 and all(lo - 1e-12 <= t <= hi + 1e-12 for t in got)
    steps = {round(b - a, 12) for a, b in zip(got, got[1:])}
    assert len(steps) == 1
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5))


def test_a_chart_is_well_formed_svg_with_one_polyline_per_series():
    panel = Panel("stage 1", "epoch", "loss", right_label="val accuracy", right_range=(0, 1.02),
                  lines=[Line([1, 2, 3], [1.2, 0.8, float("nan")], "train <loss>"),
                         Line([1, 2, 3], [0.5, 0.6, 0.7], "val accuracy", "green", right=True)],
                  vlines=[(2, "kept epoch")])
    uri = chart_uri([panel, Panel("empty", "x")])
    assert uri.startswith("data:image/svg+xml;base64,")
    root = ET.fromstring(base64.b64decode(uri.split(",", 1)[1]))  # raises on malformed XML
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f".//{ns}polyline")) == 2
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "train <loss>" in texts and "kept epoch" in texts and "stage 1" in texts  # escaped, then parsed back
    assert float(root.get("width")) > 0 and float(root.get("height")) > 0
