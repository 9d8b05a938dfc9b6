"""The head's configuration and its inference in numpy: torch-free, so that predicting never imports torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from headstart.numeric import sigmoid, softmax

CHUNK_ROWS = 8192  # feature rows handled at once wherever the features may be memory-mapped


@dataclass(frozen=True)
class HeadConfig:
    in_features: int
    n_classes: int
    hidden: tuple[int, ...] = ()
    dropout: float = 0.2
    # Probabilities are softmax(logits / temperature): fitted on validation after training (temperature scaling,
    # `evaluate.calibration`), so that a 90 % score is right about 90 % of the time. It never changes the label.
    temperature: float = 1.0
    # Multi-label heads: independent sigmoid outputs (no temperature), and the label's probability at or above
    # which it is on, one per output, chosen on validation (`evaluate.multilabel.choose_thresholds`).
    multi_label: bool = False
    thresholds: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        """Models saved before the temperature was stored have none: they keep their raw softmax (T = 1); models
        saved before multi-label heads are single-label."""
        return cls(int(d["in_features"]), int(d["n_classes"]), tuple(int(h) for h in d["hidden"]), float(d["dropout"]),
                   float(d.get("temperature", 1.0)), bool(d.get("multi_label", False)),
                   tuple(float(t) for t in d.get("thresholds") or ()))


def head_logits_numpy(state: dict[str, np.ndarray], cfg: HeadConfig, features: np.ndarray) -> np.ndarray:
    """The head's eval-mode forward in numpy (dropout is the identity at inference)."""
    linear_ids = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    layers = [(state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]) for i in linear_ids]
    return dense_logits((features - state["mean"]) / state["std"], layers)


def dense_logits(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Standardised rows through the linear layers (weight [out, in], bias), a ReLU between each two."""
    for n, (weight, bias) in enumerate(layers):
        x = x @ weight.T + bias
        if n < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


def head_proba(cfg: HeadConfig, state: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Class probabilities, softmax(logits / cfg.temperature) (multi-label: each label's sigmoid), chunk by chunk:
    `features` may be memory-mapped and larger than memory."""
    if cfg.multi_label:
        return np.concatenate([sigmoid(head_logits_numpy(state, cfg, np.asarray(features[i:i + CHUNK_ROWS])))
                               for i in range(0, max(len(features), 1), CHUNK_ROWS)])
    return np.concatenate([
        softmax(head_logits_numpy(state, cfg, np.asarray(features[i:i + CHUNK_ROWS])), cfg.temperature)
        for i in range(0, max(len(features), 1), CHUNK_ROWS)
    ])
