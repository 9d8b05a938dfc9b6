"""Every record that crosses a module boundary, at the bottom of the house: what a run found and decided
(`fit`), a model's figures on a set of images (`scores`) and how it was trained (`configs`). Each saved record
has `to_dict` and a `from_dict` that loads it back whole. Imports nothing of headstart's but `options`.
"""

from headstart.records.configs import FinetuneConfig, TrainConfig
from headstart.records.fit import (
    DataSource,
    Decision,
    DistributedRun,
    EvaluationResult,
    FitReport,
    HeadCandidate,
    History,
    RefitReport,
    Stage2Report,
)
from headstart.records.scores import (
    DEFAULT_THRESHOLD,
    MIN_POSITIVES,
    Calibration,
    CrossValidation,
    Evaluation,
    LabelScores,
    MultiLabelEvaluation,
    MultiLabelReport,
    MultiLabelScored,
    ReliabilityBins,
    Scored,
    TTAEvaluation,
)

__all__ = ["Calibration", "CrossValidation", "DEFAULT_THRESHOLD", "DataSource", "Decision", "DistributedRun",
           "Evaluation", "EvaluationResult", "FinetuneConfig", "FitReport", "HeadCandidate", "History",
           "LabelScores", "MIN_POSITIVES", "MultiLabelEvaluation", "MultiLabelReport", "MultiLabelScored", "RefitReport", "Scored",
           "ReliabilityBins", "Stage2Report", "TTAEvaluation", "TrainConfig"]
