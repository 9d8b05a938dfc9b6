"""The models saved under a folder, one summary each (`headstart runs`): read from their headstart.json alone."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SKIP = {"checkpoint", "tb", "mlruns", "node_modules", "__pycache__"}  # folders that never hold a model


@dataclass(frozen=True)
class RunSummary:
    """One saved model: where, what it learnt from, how, and how well (None: not measured)."""

    model: str
    data: str
    backbone: str
    strategy: str  # asked for
    kept: str  # what the run kept: "head" or "finetune"
    classes: int
    val_accuracy: float | None
    val_balanced_accuracy: float | None
    test_accuracy: float | None
    cv_accuracy: float | None
    train_s: float
    created: str

    def to_dict(self) -> dict:
        return asdict(self)


def find_runs(folder: str | Path, max_depth: int = 6) -> tuple[list[RunSummary], list[tuple[Path, str]]]:
    """The models under `folder` (itself included), sorted by creation time, and the headstart.json files that
    could not be read, with why."""
    from headstart.serve.artifact import META_FILE

    root = Path(folder)
    found: list[RunSummary] = []
    unreadable: list[tuple[Path, str]] = []
    base = len(root.parts)
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP
                         and len(Path(here, d).parts) - base <= max_depth)
        if META_FILE in files:
            try:
                found.append(_summary(Path(here), root))
            except Exception as exc:  # noqa: BLE001  a damaged or foreign file is listed as such, never fatal
                unreadable.append((Path(here) / META_FILE, " ".join(str(exc).split())[:200]))
    return sorted(found, key=lambda r: (r.created, r.model)), unreadable


def _summary(model_dir: Path, root: Path) -> RunSummary:
    from headstart.serve.artifact import META_FILE, ModelRecord

    where = model_dir / META_FILE
    record = ModelRecord.from_dict(json.loads(where.read_text(encoding="utf-8")), where)
    fit = record.fit
    source = fit.source.path if fit and fit.source else ""
    val, test = (fit.val_metrics, fit.test_metrics) if fit else (None, None)
    rel = os.path.relpath(model_dir, root)
    return RunSummary(
        model=rel if rel != "." else str(model_dir), data=source, backbone=record.backbone.name,
        strategy=fit.decision.strategy if fit else str(record.params.get("strategy", "")),
        kept=fit.decision.kept if fit else "", classes=len(record.classes),
        val_accuracy=val.accuracy if val else None, val_balanced_accuracy=val.balanced_accuracy if val else None,
        test_accuracy=test.accuracy if test else None, cv_accuracy=fit.cv.accuracy if fit and fit.cv else None,
        train_s=float(sum(fit.timings.values())) if fit else 0.0, created=record.created)
