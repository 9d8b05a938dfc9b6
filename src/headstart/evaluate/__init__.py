"""Judging a model: metrics in numpy (`metrics`) and figures (`figures`, matplotlib on demand)."""

from headstart.evaluate.metrics import Evaluation, evaluate

__all__ = ["Evaluation", "evaluate"]
