"""How the head and the backbone are trained: the settings records, torch-free, so that they are checked before
torch is loaded and saved with the model. Defaults and rules of the settings a user sets come from `options`;
the rest (label smoothing, the rate floor, warmup) are fixed by measurement and documented here.
`train.pipeline.train_config` and `finetune_config` derive both from a run's `Settings`, in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from headstart import options

_D = options.DEFAULTS


def _known(cls, d: dict) -> dict:
    """The entries of a saved config that `cls` still has (older files may hold fewer, never unknown ones)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _D["epochs"]
    batch_size: int = _D["batch_size"]
    lr: float = _D["lr"]
    weight_decay: float = _D["weight_decay"]
    label_smoothing: float = 0.1
    schedule: str = _D["schedule"]  # "cosine" (warmup then cosine) or "plateau" (reduce on plateau)
    patience: int = _D["patience"]  # epochs without a better validation loss before stopping
    balance: bool = False  # weight the loss by inverse class frequency (`policy.balance_classes` decides)
    balance_power: float = 1.0  # ... to this power: 1 when asked for by name, 0.5 when "auto" found skew
    seed: int = _D["seed"]

    def __post_init__(self) -> None:
        options.check({k: getattr(self, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "schedule",
                                                    "patience", "balance", "seed")})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class FinetuneConfig:
    unfreeze: int | str = 2  # top stages to train, or "all" (every stage and the stem); policy resolves "auto"
    epochs: int = _D["finetune_epochs"]
    views: int = _D["views"]  # augmented views per training image in the boundary store; epochs cycle through them
    augment: str = _D["augment"]
    lr: float = _D["finetune_lr"]  # rate of the top stage (the final 1x1 conv trains with it)
    head_lr: float = 1e-3
    lowest_rate: float = 0.35  # the lowest trained stage's rate, as a fraction of `lr`; geometric in between
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    batch_size: int = 32
    patience: int | None = None  # epochs without a better val loss before stopping; None: max(3, epochs // 4)
    label_smoothing: float = 0.1
    train_bn: bool = _D["train_bn"]
    # Weight the loss by inverse class frequency, and judge epochs by the class-balanced validation loss (each
    # class weighing the same), so that a rare class counts as much as a common one (`policy.balance_classes`).
    balance: bool = False
    balance_power: float = 1.0  # the training loss's class weights to this power (`TrainConfig.balance_power`)
    # Seconds the store and the epochs may take together; 0: no limit. A cap only: no epoch starts that would
    # end after it (`finetune.out_of_time`); the epochs are planned from the data, not from the clock.
    time_budget_s: float = 0.0
    seed: int = _D["seed"]
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

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        return cls(**_known(cls, d))
