"""The trackers: each writes a `RunLog` where its users look for it, and says where.

- csv: `MODEL/history.csv` (one row per epoch of each stage, Keras' CSVLogger's shape) and `MODEL/run.csv` (the
  settings, the decision and the final metrics as section,key,value rows). Standard library only.
- tensorboard: event files under `MODEL/tb`, or `LOG_DIR/<model folder's name>` so that several runs share one
  `tensorboard --logdir LOG_DIR`: scalars per epoch (`stage1/val_loss`...), the final metrics, the settings as
  hyperparameters beside them (the HPARAMS tab), the settings and decision as text, the confusion matrix as an image.
- mlflow: one run in the experiment `$MLFLOW_EXPERIMENT_NAME` (default "headstart") of the store
  `$MLFLOW_TRACKING_URI`, or of the local file store `./mlruns` when that is unset: settings as params, every epoch
  as a metric step, the final metrics, the decision as tags, and the confusion PNG, report.html and headstart.json
  as artifacts. (MLflow 3 keeps its file store in maintenance mode and asks for an opt-in, which the default
  gives; set `MLFLOW_TRACKING_URI=sqlite:///mlflow.db` or a server's URL to use another store.)
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from headstart.errors import TrackingError
from headstart.track.record import RunLog

log = logging.getLogger(__name__)

HISTORY_FILE, RUN_FILE, TB_DIR = "history.csv", "run.csv", "tb"


def track(kinds: Sequence[str], run: RunLog, log_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """Log `run` to each tracker in `kinds` (each once, in order); (tracker, where it went) for each."""
    unknown = [k for k in kinds if k not in TRACKERS]
    if unknown:
        raise TrackingError(f"unknown tracker {unknown[0]!r}; choose among {', '.join(TRACKERS)}")
    return [(kind, TRACKERS[kind](run, Path(log_dir) if log_dir else None)) for kind in dict.fromkeys(kinds)]


def to_csv(run: RunLog, log_dir: Path | None = None) -> str:
    out = log_dir / run.name if log_dir else run.model_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / HISTORY_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["stage", "epoch", "train_loss", "val_loss", "val_accuracy"])
        for e in run.epochs:
            writer.writerow([e.stage, e.epoch, *("" if v is None else repr(v)
                                                 for v in (e.train_loss, e.val_loss, e.val_accuracy))])
    with open(out / RUN_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["section", "key", "value"])
        writer.writerow(["run", "data", run.data])
        writer.writerows(["setting", k, v] for k, v in run.params.items())
        writer.writerows(["decision", k, v] for k, v in run.decision.items())
        writer.writerows(["metric", k, repr(v)] for k, v in run.metrics.items())
    return str(out / HISTORY_FILE)


def to_tensorboard(run: RunLog, log_dir: Path | None = None) -> str:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrackingError("--track tensorboard needs the tensorboard package: pip install 'headstart[tensorboard]'"
                            ) from None
    import numpy as np
    from PIL import Image

    out = log_dir / run.name if log_dir else run.model_dir / TB_DIR
    writer = SummaryWriter(log_dir=str(out))
    try:
        for e in run.epochs:
            for tag, value in e.metrics().items():
                writer.add_scalar(tag, value, e.epoch)
        writer.add_text("settings", _markdown({"data": run.data, **run.params}))
        writer.add_text("decision", _markdown(run.decision))
        png = run.model_dir / "confusion_val.png"
        if png.is_file():
            with Image.open(png) as img:
                writer.add_image("confusion_val", np.asarray(img.convert("RGB")), 0, dataformats="HWC")
        # The final metrics beside the settings: TensorBoard's HPARAMS tab compares runs by them.
        writer.add_hparams({"data": run.data, **run.params}, {f"final/{k}": v for k, v in run.metrics.items()},
                           run_name=".")
    finally:
        writer.close()
    return str(out)


def to_mlflow(run: RunLog, log_dir: Path | None = None) -> str:
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("--track mlflow needs MLflow: pip install 'headstart[mlflow]'") from None
    import time

    uri = os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
    with _file_store_allowed(not os.environ.get("MLFLOW_TRACKING_URI")):
        client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "headstart")
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else client.create_experiment(name)
        tags = {"headstart.model_dir": str(run.model_dir.resolve()), "headstart.data": run.data,
                **{f"decision.{k}": v[:5000] for k, v in run.decision.items()}}
        mlrun = client.create_run(experiment, run_name=run.name)
        run_id = mlrun.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, e.epoch) for e in run.epochs for tag, value in e.metrics().items()]
        metrics += [Metric(k, v, now, 0) for k, v in run.metrics.items()]
        params = [Param(k, v[:6000]) for k, v in run.params.items()]
        for start in range(0, max(len(metrics), 1), 1000):  # MLflow's limit per batch
            client.log_batch(run_id, metrics=metrics[start:start + 1000], params=params if start == 0 else [],
                             tags=[RunTag(k, v) for k, v in tags.items()] if start == 0 else [])
        for path in run.artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
    return f"{uri} (experiment {name!r}, run {run_id})"


@contextmanager
def _file_store_allowed(allowed: bool) -> Iterator[None]:
    """MLflow 3 refuses its local file store unless MLFLOW_ALLOW_FILE_STORE is set: set for this call alone."""
    if not allowed or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def _markdown(rows: dict[str, str]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows.items())


TRACKERS: dict[str, Callable[[RunLog, Path | None], str]] = {
    "csv": to_csv, "tensorboard": to_tensorboard, "mlflow": to_mlflow}
