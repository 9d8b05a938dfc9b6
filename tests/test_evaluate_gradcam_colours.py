"""The heat maps' colour map without matplotlib: 'jet' as matplotlib draws it (values read off matplotlib 3.11's
`colormaps["jet"]`, rounded to 4 decimals)."""

from __future__ import annotations

import numpy as np

from headstart.evaluate.gradcam import jet

MATPLOTLIB_JET = {  # x: RGB from matplotlib.colormaps["jet"](x)[:3]
    0.0: (0.0, 0.0, 0.5), 0.1: (0.0, 0.0, 0.9456), 0.25: (0.0, 0.5039, 1.0), 0.5: (0.4902, 1.0, 0.4775),
    0.75: (1.0, 0.5817, 0.0), 0.9: (0.9456, 0.0298, 0.0), 1.0: (0.5, 0.0, 0.0),
}


def test_jet_matches_matplotlib() -> None:
    x = np.array(list(MATPLOTLIB_JET))
    np.testing.assert_allclose(jet(x), np.array(list(MATPLOTLIB_JET.values())), atol=6e-5)


def test_jet_clips_and_keeps_the_shape() -> None:
    heat = np.array([[-1.0, 0.5], [2.0, np.float32(0.25)]], np.float32)
    out = jet(heat)
    assert out.shape == (2, 2, 3) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[0, 0], jet(np.array(0.0))) and np.testing.assert_allclose(out[1, 0], jet(np.array(1.0)))
