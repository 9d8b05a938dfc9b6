"""How the head and the backbone are trained: the settings records, torch-free, so that they are checked before
torch is loaded and saved with the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    schedule: str = "cosine"  # "cosine" (warmup then cosine) or "plateau" (reduce on plateau)
    patience: int = 10  # epochs without a better validation loss before stopping
    balance: bool = False  # weight the loss by inverse class frequency
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "plateau"):
            raise ValueError(f"schedule must be 'cosine' or 'plateau', not {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:  # NaN too
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneConfig:
    unfreeze: int | str = 2  # top stages to train, or "all" (every stage and the stem)
    epochs: int = 8
    views: int = 8  # augmented views per training image in the boundary store; epochs cycle through them
    augment: str = "light"
    lr: float = 5e-4  # rate of the top stage (the final 1x1 conv trains with it)
    head_lr: float = 1e-3
    lowest_rate: float = 0.35  # the lowest trained stage's rate, as a fraction of `lr`; geometric in between
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    batch_size: int = 32
    patience: int | None = None  # epochs without a better val loss before stopping; None: max(3, epochs // 4)
    label_smoothing: float = 0.1
    train_bn: bool = False
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False  # bfloat16 autocast for the trained top (always on CUDA)

    @property
    def stop_after(self) -> int:
        """Early-stopping patience, in epochs without a better stage-2 validation loss: a quarter of the run, at
        least 3."""
        return self.patience if self.patience is not None else max(3, self.epochs // 4)

    @property
    def use_bf16(self) -> bool:
        return self.bf16 or self.device.startswith("cuda")

    def to_dict(self) -> dict:
        return asdict(self)
