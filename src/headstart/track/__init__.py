"""Experiment tracking: a finished run's settings, epochs, decision, final metrics and figures, written to a CSV
file, TensorBoard event files or an MLflow store (`train --track csv|tensorboard|mlflow`), and the listing of the
models under a folder (`headstart runs`).

A run is logged once it is saved, from its `FitReport` (`record.RunLog`): training takes seconds, so there is
nothing to watch live, and every tracker sees the same numbers `headstart.json` keeps. TensorBoard and MLflow are
optional extras (`pip install 'headstart[tensorboard]'`, `'headstart[mlflow]'`), imported only when asked for.
"""

from headstart.track.record import EpochRow, RunLog, run_log
from headstart.track.writers import TRACKERS, track

__all__ = ["EpochRow", "RunLog", "TRACKERS", "run_log", "track"]
