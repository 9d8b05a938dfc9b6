"""Judging a model: metrics in numpy (`metrics`), the confusion-matrix PNG (`figures`, Pillow) and the report's
charts (`svg_plot`)."""

from headstart.evaluate.metrics import evaluate
from headstart.records import Evaluation

__all__ = ["Evaluation", "evaluate"]
