"""The head's trainable weights in numpy: what stage 1 fits on cached features without importing torch.

Its `state_dict()` has the keys and shapes of the torch `heads.module.Head` (`mean`, `std`, `layers.N.weight`,
`layers.N.bias`), so a fitted head loads into that module for fine-tuning, Grad-CAM and export, and is saved as
any head is. Fitting it in numpy rather than torch keeps `import torch` (~1.1 s of a ~17 s cold flowers `train`
on 2 cores, where the cores are already busy extracting and a background import only slowed extraction) off a
CPU training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from headstart.heads.config import CHUNK_ROWS, HeadConfig, dense_logits

# A feature (nearly) constant over the training photos got a std of ~1e-6: on elpv's grayscale solar cells 30 of
# lite0's 1,904 pooled features are zero on every training photo. A validation or new photo on which one of them
# is not zero was then standardised to values in the thousands, and its logits with them: the head's validation
# loss was 14.4 (accuracy 0.791, balanced 0.522 on elpv's own split); with the std floored at 0.1 % of the median
# std it is 0.65 (0.802, 0.528; with the square-root class weights 0.783 / 0.605 against 0.759 / 0.557). A floor
# of 1 % did as well there but cost a 160-photo flowers subset one validation photo of 40.
STD_FLOOR = 0.001


def floored_std(std: np.ndarray) -> np.ndarray:
    """`std` with no entry below `STD_FLOOR` times its median (a constant feature's x - mean stays 0)."""
    std = np.asarray(std, np.float64)
    return np.maximum(std, STD_FLOOR * float(np.median(std))).astype(np.float32)


@dataclass(eq=False)
class HeadParams:
    """Standardisation statistics, then a linear layer per `cfg.hidden` width and a last one to the classes;
    dropout (before each linear layer) is the training loop's. Mutable: the optimizer updates it in place."""

    cfg: HeadConfig
    mean: np.ndarray  # [in_features] float32
    std: np.ndarray
    weights: list[np.ndarray]  # [out, in] float32, as torch's nn.Linear stores them
    biases: list[np.ndarray]
    training: bool = True  # what a torch module's .train()/.eval() would say; the loop sets it

    @classmethod
    def fresh(cls, cfg: HeadConfig, seed: int) -> "HeadParams":
        """The weights torch draws for the same layers after `torch.manual_seed(seed)` (bit for bit; a test
        checks it): its nn.Linear init, each layer's weight then its bias, from its Mersenne Twister stream. The
        same draw keeps what a seed gave when the head trained in torch (hymenoptera's seed 0 validates at 0.961,
        the mean of 16 seeds is 0.94). Its own generator: safe from any thread."""
        stream = _TorchUniform(seed)
        widths = [cfg.in_features, *cfg.hidden, cfg.n_classes]
        weights, biases = [], []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            # nn.Linear.reset_parameters: kaiming_uniform_(a=sqrt(5)) for the weight, 1/sqrt(fan_in) for the bias.
            gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
            weights.append(stream.uniform((fan_out, fan_in), math.sqrt(3.0) * (gain / math.sqrt(fan_in))))
            biases.append(stream.uniform((fan_out,), 1 / math.sqrt(fan_in)))
        return cls(cfg, np.zeros(cfg.in_features, np.float32), np.ones(cfg.in_features, np.float32), weights, biases)

    def set_standardization(self, features: np.ndarray, chunk: int = CHUNK_ROWS) -> None:
        """Per-feature mean and std, two passes over chunks in float64: the features may be memory-mapped and
        larger than memory."""
        n = len(features)
        mean = sum(features[i:i + chunk].sum(0, dtype=np.float64) for i in range(0, n, chunk)) / n
        var = sum(((features[i:i + chunk] - mean) ** 2).sum(0) for i in range(0, n, chunk)) / n
        std = np.sqrt(var)
        # A feature constant over the training rows (a channel int8 or a ReLU leaves at 0) would divide any other
        # image's value by ~1e-6: one planet_sample validation chip scored 1e5 standard deviations and a validation
        # loss of 4.3 against 0.15. Such a feature carries nothing to learn from; it is scaled by the median
        # feature's spread instead, so an unusual value stays an ordinary input. Only (near-)constant ones: a floor
        # at 1 % of the median also rescaled rare-but-informative features and cost the small flowers test 2 of 40
        # validation photos.
        median = float(np.median(std)) if len(std) else 0.0
        std = np.where(std < 1e-4 * median, median, std)
        self.mean = mean.astype(np.float32)
        self.std = floored_std(std + 1e-6)  # and no spread under 0.1 % of the median's (`floored_std`)

    def standardize(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float32) - self.mean) / self.std

    @property
    def tensors(self) -> list[np.ndarray]:
        """The trained arrays in the optimizer's order: each layer's weight, then its bias."""
        return [t for pair in zip(self.weights, self.biases) for t in pair]

    def logits(self, standardized: np.ndarray) -> np.ndarray:
        """The eval-mode forward of standardised rows (dropout is the identity)."""
        return dense_logits(standardized, list(zip(self.weights, self.biases)))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies, keyed as the torch Head's state dict (its linear layers sit at 1, 4, 7, ... of `layers`)."""
        state = {"mean": self.mean.copy(), "std": self.std.copy()}
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            state[f"layers.{3 * j + 1}.weight"], state[f"layers.{3 * j + 1}.bias"] = w.copy(), b.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copied into the arrays in place, as torch's is: an optimizer holding them keeps updating these."""
        self.mean, self.std = np.array(state["mean"], np.float32), np.array(state["std"], np.float32)
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            np.copyto(w, state[f"layers.{3 * j + 1}.weight"])
            np.copyto(b, state[f"layers.{3 * j + 1}.bias"])


class _TorchUniform:
    """torch's CPU `uniform_(-bound, bound)` on float32 after `torch.manual_seed(seed)`: 32-bit Mersenne Twister
    words (numpy's RandomState seeds and draws them as torch does; its stream is frozen by numpy's policy), the
    low 24 bits scaled to [0, 1) and mapped in double precision, as ATen's `uniform_real` does."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed % 2**32)

    def uniform(self, shape: tuple[int, ...], bound: float) -> np.ndarray:
        lo, hi = np.float32(-bound), np.float32(bound)
        words = self.rng.randint(0, 2**32, size=math.prod(shape), dtype=np.uint32)
        unit = (words & ((1 << 24) - 1)).astype(np.float64) * 2.0**-24
        return (unit * np.float64(hi - lo) + np.float64(lo)).astype(np.float32).reshape(shape)
