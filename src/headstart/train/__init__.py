"""Training: loop pieces (`loop`), head fitting (`fit_head`, `crossval`), stage 2 (`finetune`, `stage2`, `deep`),
checkpoints, the pipeline. Only the torch-free settings records (from `records`) are re-exported here: the rest
imports torch."""

from headstart.records import FinetuneConfig, TrainConfig

__all__ = ["FinetuneConfig", "TrainConfig"]
