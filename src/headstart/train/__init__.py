"""Training: settings records (`config`, torch-free), loop pieces (`loop`), head fitting (`fit_head`), stage 2
(`finetune`, `stage2`), checkpoints. Only `config` is imported here: the rest imports torch."""

from headstart.records import FinetuneConfig, TrainConfig

__all__ = ["FinetuneConfig", "TrainConfig"]
