"""The two output functions every layer shares, written once: softmax (with a temperature) and the sigmoid.
numpy only, at the bottom, so that records, heads, evaluation and the predictor agree to the bit."""

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
