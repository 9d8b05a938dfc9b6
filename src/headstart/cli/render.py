"""What the CLI draws: the progress sink, result tables, CSV and JSON. rich and the standard library only.

Results go to stdout, everything else (progress, notes, skipped files, logs) to stderr, so that
`--format csv|json` output can be piped. Consoles are built per call rather than at import because rich
reads COLUMNS, NO_COLOR and friends when a Console is constructed.

User-controlled strings (paths, class names, error reasons) are wrapped in `Text` or printed with
`typer.echo`: passed to rich as plain strings, a name like "[red]" would be read as markup. They also pass
through `shown` first: a file name that is not valid UTF-8 reaches Python with its bad bytes as surrogate escapes,
which a UTF-8 stdout refuses (a traceback, all output lost) or, under C.UTF-8, writes raw into a CSV. `shown`
writes each such byte as a backslash, x and two hex digits instead (the name b"\\xff.jpg" is shown as `\\xff.jpg`),
in the table, CSV and JSON alike. A name that really holds those four characters looks the same: rare, and
readable, where the alternative is a crash or a byte that is not text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from headstart.text import shown  # noqa: F401  re-exported: the CLI modules call render.shown

if TYPE_CHECKING:  # these pull in numpy or torch; the CLI only reads their attributes
    from headstart.api import ImageClassifier
    from headstart.backbones.registry import BackboneSpec
    from headstart.records import Decision, Evaluation, HeadCandidate

MAX_SKIPPED_LISTED = 50
MAX_CONFUSION_CLASSES = 20  # beyond this a terminal table is unreadable; the PNG still has it all


def out_console() -> Console:
    return Console()


def err_console() -> Console:
    return Console(stderr=True)


def setup_logging(level: int) -> None:
    # force=True: the CLI owns the process, and repeated in-process runs (tests) must not keep a stale level.
    handler = RichHandler(console=err_console(), show_time=False, show_path=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


def note(message: str) -> None:
    """One plain line on stderr, for anything that is not a result."""
    typer.echo(shown(message), err=True)


# --------------------------------------------------------------------------- shared bits


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _split_totals(counts: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{split} {sum(per_class.values())}" for split, per_class in counts.items())


def _eval_line(ev: Evaluation) -> str:
    return f"accuracy {_pct(ev.accuracy)}, balanced accuracy {_pct(ev.balanced_accuracy)} (n={ev.n})"


def _widest(header: str, cells: Sequence[str]) -> int:
    return max([len(header), *(len(c) for c in cells)])


def _table_frame(columns: int) -> int:
    """Characters a rich Table with borders adds around `columns` cells: a rule each side, one space of padding."""
    return 3 * columns + 1


def write_confusion(evaluation: Evaluation, path: Path, title: str) -> Path | None:
    """The PNG is a by-product: a read-only model directory must not cost the user the metrics."""
    from headstart.evaluate import figures  # Pillow, only when a figure is drawn

    try:
        return figures.save_confusion_png(evaluation.confusion, evaluation.classes, path, title=title)
    except OSError as exc:
        note(f"warning: could not write {path}: {exc.strerror or exc}")
        return None


def print_skipped(skipped: Sequence[tuple[Path, str]]) -> None:
    for path, reason in skipped[:MAX_SKIPPED_LISTED]:
        note(f"skipped: {path}: {' '.join(str(reason).split())}")
    if len(skipped) > MAX_SKIPPED_LISTED:
        note(f"... and {len(skipped) - MAX_SKIPPED_LISTED} more")


def _key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, Text(shown(value)))
    return table


# --------------------------------------------------------------------------- train


def _engine_line(clf: ImageClassifier) -> str:
    """Which engine computed the features: predictions, exports and the service keep to it (headstart.json
    records it under params.engine)."""
    asked, ran = clf.engine, clf.frozen_.engine_name
    what = {"int8": "int8 ONNX Runtime", "fp32": "float32 ONNX Runtime"}.get(ran, ran)
    return f"engine {what}" + (" (auto on this CPU)" if asked == "auto" else "")


def train_summary(
    clf: ImageClassifier, data: Path, backbone: str, saved: Path, confusion_png: Path | None
) -> Table:
    classes = clf.classes_
    listed = ", ".join(classes[:10]) + (f" ... (+{len(classes) - 10})" if len(classes) > 10 else "")
    total = sum(sum(per_class.values()) for per_class in clf.counts_.values())
    history = clf.history_
    timings = clf.timings_
    epochs_run = len(history.train_loss)
    decision = clf.decision_
    rows = [
        ("data", str(data)),
        ("classes", f"{len(classes)}: {listed}"),
        ("images", _split_totals(clf.counts_)),
        ("skipped files", str(len(clf.skipped_))),
        ("backbone", _backbone_line(_with_companion(backbone, clf.frozen_), clf.frozen_.spec.preprocess,
                                    decision.native_input)),
        ("head", _averaged_head_line(decision.head_candidates) if decision.kept == "oriented"
         else _head_line(clf.head_config_, _kept_head_candidates(decision))),
        (
            "features",
            f"{total - clf.cached_} extracted, {clf.cached_} from cache, {timings.get('features_s', 0.0):.1f} s; "
            f"{_engine_line(clf)}",
        ),
        (
            "training",
            f"{epochs_run} epochs{' (stopped early)' if history.stopped_early else ''}, "
            f"best epoch {history.best_epoch + 1}, "
            + (f"{timings['oriented_s']:.1f} s (the oriented head, with its 8 orientations' extraction"
               + (" and its refit)" if clf.decision_.refitted else ")")
               if "oriented_s" in timings else f"{timings.get('train_s', 0.0):.1f} s"),
        ),
    ]
    if decision.strategy != "head":
        rows.append(("strategy", _decision_line(decision, timings)))
    if decision.balanced:
        power = clf.report_.train_config.balance_power
        rows.append(("class weights", f"inverse class frequency ^ {power:g} (" + ("the classes are skewed" if
                     power < 1 else "--balance") + "); balanced accuracy chose between models"))
    if decision.groups:  # photos in near-identical groups would have scored copies of their training photos
        rows.append(("groups", decision.groups))
    rows += _honest_rows(clf)
    rows += _weak_rows(clf)
    rows.append(("calibration", _calibration_line(clf)))
    rows.append(("saved to", str(saved)))
    if confusion_png is not None:
        rows.append(("confusion (val)", str(confusion_png)))
    return _key_value_table("headstart train", rows)


def _honest_rows(clf: ImageClassifier) -> list[tuple[str, str]]:
    """Each score with the split it comes from and what that split chose: validation chose the head, its stopping
    epoch and (with --strategy auto) the strategy, so its score flatters; the test split chose nothing. Then the
    k-fold accuracy of the kept settings, and whether the shipped head was refitted."""
    decision, rows = clf.decision_, []
    refitted = decision.refitted > 0
    if clf.val_metrics_ is not None:
        chose = (["the head"] if decision.kept_head_candidates else []) + ["its stopping epoch"] \
            + (["the strategy"] if decision.strategy == "auto" else []) \
            + (["the temperature"] if getattr(clf.report_, "calibration", None) else [])
        before = "; of the head before its refit" if refitted else ""
        rows.append(("validation", f"{_eval_line(clf.val_metrics_)}; this split chose {_listed(chose)}, so it "
                                   f"flatters{before}"))
    if clf.test_metrics_ is not None:
        rows.append(("test", f"{_eval_line(clf.test_metrics_)}; this split chose nothing"
                             + ("; of the shipped (refitted) head" if refitted else "")))
    cv = clf.cv_
    if cv is not None:
        rows.append(("cross-validation", f"{cv.folds}-fold accuracy {_pct(cv.accuracy)}, 95% interval "
                     f"{_pct(cv.low)}-{_pct(cv.high)} (n={cv.n}, {cv.rows.replace('+', ' + ')}; at the settings "
                     "validation chose" + (f"; {cv.groups} groups each kept in one fold" if cv.groups else "")
                     + ")"))
    elif getattr(clf.report_, "cv_skipped", ""):
        rows.append(("cross-validation", f"not run: {clf.report_.cv_skipped}"))
    if refitted:
        rows.append(("refit", f"the shipped head was refitted on train + val ({decision.refitted} images) for "
                              f"{clf.history_.best_epoch + 1} epochs, the settings validation chose"))
    return rows


def _weak_rows(clf: ImageClassifier) -> list[tuple[str, str]]:
    """The classes the kept model finds under half of on validation, and what would most likely help."""
    from headstart.train.policy import weak_classes

    weak = weak_classes(clf.val_metrics_)
    if not weak:
        return []
    listed = ", ".join(f"{name} (recall {recall:.2f} of {n})" for name, recall, n in weak)
    advice = "more photos of them would help most"
    if clf.decision_.kept == "head":
        advice += "; --strategy finetune adapts the backbone to them"
    elif clf.decision_.stage2 is not None:
        advice += "; a longer --time-limit lets fine-tuning run more epochs"
    return [("weak classes", f"{listed}: {advice}")]


def _calibration_line(clf: ImageClassifier) -> str:
    """The stored temperature and the validation ECE it took away (measured where it was fitted); or why none."""
    from headstart.evaluate.calibration import MIN_CALIBRATION

    cal = clf.report_.calibration
    if cal is None:
        n = clf.val_metrics_.n if clf.val_metrics_ is not None else 0
        return (f"none (T = 1): {n} validation images, {MIN_CALIBRATION} needed" if n
                else "none (T = 1): no validation split")
    if cal.refused:
        return f"T = 1: the fitted {cal.refused:.3g} raised val ECE, so none is kept"
    return f"T = {cal.temperature:.2f}: val ECE {cal.ece_before:.3f} -> {cal.ece_after:.3f}"


def _listed(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _with_companion(backbone: str, frozen) -> str:
    """The backbone's name, and its companion's when it has one (`train.oriented.with_companion`)."""
    if frozen.companion is None:
        return backbone
    return f"{backbone} and {frozen.companion.spec.name} side by side (features joined)"


def _backbone_line(backbone: str, pre, native_input: int = 0) -> str:
    line = f"{backbone}, {pre.input_size} px" + (" (the photos' own size: they are small)" if native_input else "")
    if pre.native_size == pre.input_size:  # the oriented stage's second view (`train.oriented.oriented_base`)
        line += " + the whole photo, uncropped"
    elif pre.native_size:
        line += f" + a {pre.native_size} px native view (the photos are small)"
    if pre.orientations == 2:  # a fine-tuned model's mirror image (`train.stage2.mirrored_features`)
        return line + "; each photo's features averaged with its mirror image's"
    return line + (f"; each photo's features averaged over its {pre.orientations} turns and mirror images"
                   if pre.orientations > 1 else "")


def _head_name(hidden: Sequence[int], dropout: float) -> str:
    return f"hidden {'-'.join(map(str, hidden))}, dropout {dropout:g}" if hidden else f"linear, dropout {dropout:g}"


def _head_line(cfg, candidates: Sequence[HeadCandidate] | None) -> str:
    line = _head_name(cfg.hidden, cfg.dropout)
    if candidates:
        line += " (lowest val loss of " + ", ".join(
            f"{_head_name(c.hidden, c.dropout)}: {c.val_loss:.3f}" for c in candidates) + ")"
    return line


def _averaged_head_line(candidates: Sequence[HeadCandidate]) -> str:
    """The oriented stage's head: its seeds' heads and (since 2026-12) a logistic regression, saved as one head whose
    logits are their mean (`train.oriented.merge_heads`, `with_linear`)."""
    nets = [c for c in candidates if c.hidden]
    linear = [c for c in candidates if not c.hidden]
    if not nets:
        return "linear"
    line = (f"{len(nets)} heads of {_head_name(nets[0].hidden, nets[0].dropout)} "
            f"(val loss {', '.join(f'{c.val_loss:.3f}' for c in nets)}), their logits averaged")
    return line + (f", then averaged with a logistic regression's (val loss {linear[0].val_loss:.3f})" if linear
                   else "")


def _kept_head_candidates(decision: Decision) -> tuple[HeadCandidate, ...] | None:
    """The heads the kept one was chosen among (stage 1's, or the refit's after fine-tuning); None: no choice."""
    return decision.kept_head_candidates or None


def _decision_line(decision: Decision, timings: dict) -> str:
    line = f"{decision.strategy}: kept {decision.kept}"
    stage2 = decision.stage2
    if stage2 is not None:
        refitted = ", head refitted" if stage2.refit is not None and stage2.refit.kept else ""
        head = f"head {decision.head_val_accuracy:.3f}, " if decision.head_val_accuracy is not None else ""
        mirror = "" if stage2.mirrored_accuracy is None else (
            f", with each photo's mirror image averaged in {stage2.mirrored_accuracy:.3f}"
            + (", kept" if stage2.mirrored else ", not kept"))
        line += (f" (val accuracy {head}fine-tuned{refitted} {stage2.val_accuracy:.3f}{mirror}; "
                 f"{timings.get('finetune_s', 0.0):.0f} s)")
    if decision.reason and decision.strategy == "auto":
        line += f"; {decision.reason}"
    if decision.plan:
        line += f"; {decision.plan}"
    return line


# --------------------------------------------------------------------------- evaluate


def print_evaluation(ev: Evaluation) -> None:
    console = out_console()
    console.print(
        _key_value_table(
            "evaluation",
            [
                ("images", str(ev.n)),
                ("accuracy", _pct(ev.accuracy)),
                ("balanced accuracy", _pct(ev.balanced_accuracy)),
                ("log loss", f"{ev.log_loss:.4f}"),
                ("ECE", f"{ev.ece:.4f}"),
            ],
        )
    )

    per_class = Table(title="per class", title_justify="left")
    per_class.add_column("class")
    for name in ("precision", "recall", "F1", "support"):
        per_class.add_column(name, justify="right")
    for i, cls in enumerate(ev.classes):
        per_class.add_row(
            Text(shown(cls)), f"{ev.precision[i]:.3f}", f"{ev.recall[i]:.3f}", f"{ev.f1[i]:.3f}", str(int(ev.support[i]))
        )
    console.print(per_class)

    if len(ev.classes) > MAX_CONFUSION_CLASSES:
        note(f"confusion matrix has {len(ev.classes)} classes: too wide for the terminal, see the PNG")
        return
    confusion = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
    confusion.add_column("true \\ predicted")
    for cls in ev.classes:
        confusion.add_column(Text(shown(cls)), justify="right")
    for i, cls in enumerate(ev.classes):
        cells = [
            Text(str(int(v)), style="bold green" if i == j else ("red" if v else "dim"))
            for j, v in enumerate(ev.confusion[i])
        ]
        confusion.add_row(Text(shown(cls)), *cells)
    console.print(confusion)


def evaluation_json(ev: Evaluation, skipped: Sequence[tuple[Path, str]]) -> str:
    payload = ev.to_dict()
    payload["classes"] = [shown(c) for c in payload.get("classes", [])]
    payload["skipped"] = [{"path": shown(path), "reason": shown(reason)} for path, reason in skipped]
    return json.dumps(payload, indent=2)


# predict's table, CSV and JSON: cli/render_predictions.py


# --------------------------------------------------------------------------- backbones

# Dropped in this order when the table is wider than the terminal; the name, what a user types, always stays.
_BACKBONE_COLUMNS_DROPPED = ("note", "weights", "params (M)", "input", "timm model", "offline")


def backbones_table(specs: Sequence[BackboneSpec], offline: Sequence[bool], default: str, width: int = 200) -> Table:
    sources = {"package": "bundled package", "hub": "hub download"}
    columns: dict[str, list[str]] = {
        "name": [s.name for s in specs],
        "timm model": [s.timm_name for s in specs],
        "input": [f"{s.preprocess.input_size}px" for s in specs],
        "params (M)": [f"{s.params_m:.1f}" for s in specs],
        "weights": [sources.get(s.source, s.source) for s in specs],
        "offline": ["yes" if ok else "no" for ok in offline],
        "note": ["default" if s.name == default else "" for s in specs],
    }
    kept = list(columns)
    for name in _BACKBONE_COLUMNS_DROPPED:
        if sum(_widest(c, columns[c]) for c in kept) + _table_frame(len(kept)) <= width:
            break
        kept.remove(name)
    title = "backbones" if "note" in kept else f"backbones (default: {default})"
    table = Table(title=title, title_justify="left")
    for name in kept:
        # Names are never wrapped: a user copies them into --backbone.
        table.add_column(name, no_wrap=True, justify="right" if name in ("input", "params (M)") else "left")
    for i in range(len(specs)):
        table.add_row(*(_offline_cell(columns[c][i]) if c == "offline" else columns[c][i] for c in kept))
    return table


def _offline_cell(value: str) -> Text:
    return Text(value, style="green" if value == "yes" else "yellow")
