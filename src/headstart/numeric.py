"""The functions every layer shares, written once: softmax (with a temperature), the sigmoid, and the mean of a
photo's features over its orientations. numpy only, at the bottom, so that records, heads, evaluation, training
and the predictor agree to the bit."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) row by row, in the logits' own float type."""
    z = logits / temperature if temperature != 1.0 else logits
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow warnings for large negative logits."""
    return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, np.float32)))).astype(np.float32)


def mean_features(views) -> np.ndarray:
    """The mean of equally shaped float32 feature arrays, summed in float64 in the order given: training (from
    each orientation's cache) and predicting (`runtime.engines.OrientedEngine`) give the same bits."""
    total = None
    count = 0
    for v in views:
        total = np.asarray(v, np.float64) if total is None else total + np.asarray(v, np.float64)
        count += 1
    return (total / count).astype(np.float32)
