"""How the head is trained: one loop, read top to bottom, on cached features.

AdamW, a schedule (reduce-on-plateau or warmup + cosine), early stopping on validation loss with the best weights
restored at the end (fastai/Keras `restore_best_weights`), optional class weights.

Divergence: a training or validation loss that is not finite stops that head at once. Its weights are not kept
(NaN losses never beat the best, so "the best" would silently be the untrained head): `fit_head` raises a
ConfigError saying to lower the learning rate; `fit_best_head` drops the diverged candidates with a warning and
raises only when every one diverged.

numpy, not torch (`heads.params`, `train.head_step`): a CPU training run never imports torch.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import numpy as np

from headstart.errors import ConfigError
from headstart.heads.config import CHUNK_ROWS, HeadConfig
from headstart.heads.params import HeadParams
from headstart.progress import NoProgress, Progress
from headstart.records import HeadCandidate, History, TrainConfig
from headstart.runtime import distributed
from headstart.runtime.device import cpu_threads, one_blas_thread
from headstart.train.head_step import AdamW, bce_loss, class_weights, cross_entropy, positive_weights, train_step
from headstart.train.loop import BestTracker, Plateau, warmup_cosine

log = logging.getLogger(__name__)


def fit_head(
    head_cfg: HeadConfig, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray,
    x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, progress: Progress | None = None,
    head: HeadParams | None = None,
) -> tuple[HeadParams, History]:
    """Train a head on features: `head` if given (untrained, standardised for `x_train` already), else a fresh
    one drawn from `cfg.seed`. Without validation data, trains for all epochs and keeps the last. A diverged
    training (a loss that is not finite) is a ConfigError."""
    with one_blas_thread():
        try:
            return _fit_head(head_cfg, cfg, x_train, y_train, x_val, y_val, progress, head)[:2]
        except _Diverged as diverged:
            raise ConfigError(str(diverged)) from None


class _Diverged(Exception):
    """A head's loss stopped being finite; the message says where and what to do."""

    def __init__(self, which: str, loss: float, epoch: int, cfg: TrainConfig) -> None:
        super().__init__(f"training diverged: the head's {which} loss became {loss} at epoch {epoch + 1} with "
                         f"learning rate {cfg.lr:g}; lower the learning rate (lr, --lr), e.g. to {cfg.lr / 10:g}")


def _fit_head(head_cfg, cfg, x_train, y_train, x_val, y_val, progress, head, stop_after: int | None = None,
              replay_lrs: tuple[float, ...] = (), after_epoch=None) -> tuple[HeadParams, History, tuple[float, ...]]:
    """`fit_head` at whatever thread count the caller pinned, and the plateau rate each epoch started at. The
    schedule spans `cfg.epochs` whatever `stop_after` (epochs to run) says, and `replay_lrs` replaces the plateau's
    own rates: a refit follows the rates of the run that chose its epoch count; `after_epoch(epoch, head, history)`
    is called after each epoch and stops the loop by returning True. The loop reads top to bottom,
    nanoGPT-style: it is longer than 60 lines because splitting the epoch from its validation would only pass their
    state around."""
    progress = progress or NoProgress()
    rng = np.random.default_rng(cfg.seed)
    if head is None:
        head = fresh_head(head_cfg, cfg.seed)
        head.set_standardization(x_train)
        prior_bias(head, y_train)
    train_rows = _standardized_rows(head, x_train)
    multi = head_cfg.multi_label  # y: 0/1 targets [n, labels], binary cross-entropy per label
    yt = np.asarray(y_train, np.float32 if multi else np.int64)
    has_val = x_val is not None and len(x_val) > 0
    if has_val:
        val_rows = _standardized_rows(head, x_val)
        yv = np.asarray(y_val, np.float32 if multi else np.int64)

    weight = (None if not cfg.balance else positive_weights(yt) if multi
              else class_weights(yt, head_cfg.n_classes, cfg.balance_power))
    opt = AdamW(head.tensors, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(yt) / cfg.batch_size)
    cosine = warmup_cosine(cfg.epochs * steps_per_epoch, max(1, int(0.05 * cfg.epochs * steps_per_epoch)))
    plateau = Plateau(cfg.lr, factor=0.3, patience=max(1, cfg.patience // 3))
    history = History()
    tracker = BestTracker(patience=cfg.patience, state=head.state_dict())

    drop_rng = distributed.dropout_rng(rng, cfg.seed)  # `rng` itself in one process
    epochs = min(stop_after or cfg.epochs, cfg.epochs)
    lrs: list[float] = []
    progress.start("training head", epochs)
    for epoch in range(epochs):
        if replay_lrs:
            plateau.lr = replay_lrs[min(epoch, len(replay_lrs) - 1)]
        lrs.append(plateau.lr)
        head.training = True
        order = rng.permutation(len(yt))
        total = 0.0
        for start in range(0, len(yt), cfg.batch_size):
            idx = np.sort(order[start:start + cfg.batch_size])  # sorted rows read a memory map sequentially
            # under torchrun: this rank's rows (a multi-label loss is a plain mean over rows, whatever its weights)
            mine, share = distributed.split_batch(idx, yt, None if multi else weight)
            loss, grads = train_step(head, train_rows(mine), yt[mine], weight, cfg.label_smoothing, drop_rng, share)
            distributed.sum_arrays(grads)
            opt.step(grads, cfg.lr * cosine(opt.steps) if cfg.schedule == "cosine" else plateau.lr)
            total += loss * len(idx)
        history.train_loss.append(distributed.sum_over_ranks(total)[0] / len(yt))
        progress.advance(1)
        if not math.isfinite(history.train_loss[-1]):
            raise _Diverged("training", history.train_loss[-1], epoch, cfg)
        if not has_val:
            if after_epoch is not None and after_epoch(epoch, head, history):
                break
            continue

        head.training = False
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged head's logits: reported just below
            logits = np.concatenate([head.logits(val_rows(slice(i, i + CHUNK_ROWS)))
                                     for i in range(0, len(yv), CHUNK_ROWS)])
            val_loss = distributed.same(bce_loss(logits, yv) if multi else cross_entropy(logits, yv))[0]
        history.val_loss.append(val_loss)
        # multi-label: the fraction of (image, label) pairs right at 0.5, one minus the Hamming loss
        history.val_accuracy.append(float(((logits > 0) == yv).mean() if multi else (logits.argmax(1) == yv).mean()))
        if not math.isfinite(val_loss):
            raise _Diverged("validation", val_loss, epoch, cfg)
        if cfg.schedule == "plateau":
            plateau.step(val_loss)
        if tracker.update(val_loss, head.state_dict):
            history.best_epoch = epoch
        if after_epoch is not None:
            after_epoch(epoch, head, history)
        if tracker.bad_epochs and tracker.should_stop:
            history.stopped_early = True
            break
    progress.finish()

    if has_val:
        head.load_state_dict(tracker.state)
    else:
        history.best_epoch = epochs - 1
    log.info("head trained: best epoch %d of %d", history.best_epoch + 1, len(history.train_loss))
    head.training = False
    return head, history, tuple(lrs)


class _AdvanceOnly:
    """One bar shared by concurrent fits: each advances it; starting and finishing it is the caller's."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def start(self, task: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        self.progress.advance(n)

    def finish(self) -> None:
        pass


def prior_bias(head: HeadParams, y_train: np.ndarray) -> None:
    """A multi-label head's output biases set to each label's log prior odds in `y_train` (RetinaNet's prior
    initialisation): from a bias of 0 every label starts at probability 0.5, and a rare label's bias spends most of
    a short schedule walking down to its prior (planet_sample, 6 seeded inner splits, linear head, thresholds at
    0.5: micro F1 0.590 -> 0.836, mAP 0.538 -> 0.584 with it). Single-label heads are left as drawn."""
    if not head.cfg.multi_label:
        return
    rate = np.clip(np.asarray(y_train, np.float64).mean(0), 1e-3, 1 - 1e-3)
    head.biases[-1][:] = np.log(rate / (1 - rate)).astype(np.float32)


def fresh_head(head_cfg: HeadConfig, seed: int) -> HeadParams:
    """An untrained head drawn from `seed` (its own generator: safe from any thread)."""
    return HeadParams.fresh(head_cfg, seed)


@dataclass(frozen=True)
class FittedHead:
    """The head `fit_best_head` kept, with its history and training config, and every candidate it chose among."""

    head: HeadParams
    history: History
    train_config: TrainConfig
    candidates: tuple[HeadCandidate, ...]
    epoch_lrs: tuple[float, ...] = ()  # the plateau rate each epoch started at (what a refit replays)
    refit: HeadParams | None = None  # the kept candidate refitted on train + val (`fit_best_head`'s x_full), if asked

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self.head.state_dict()


def fit_best_head(
    candidates: list[tuple[HeadConfig, TrainConfig]], x_train: np.ndarray, y_train: np.ndarray,
    x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, progress: Progress | None = None,
    x_full: np.ndarray | None = None, y_full: np.ndarray | None = None,
) -> FittedHead:
    """Fit each candidate head and keep the one with the lowest best validation loss (the first, when there is
    no validation data), with its history and training config and each candidate's best validation loss.

    Candidates train at once, one thread each: numpy's BLAS releases the GIL in its matrix products, so two
    single-threaded fits on two cores take about as long as the slower one. Their standardisation is computed
    once: it depends on the features alone.

    With `x_full` (train + validation rows), each candidate is also refitted on them (`refit_full`) by a shadow
    that starts at once rather than when the candidate's stopping epoch is known (`_Shadow`): on two cores the
    refit of the slower candidate then runs beside it on the core the faster one leaves idle (flowers: 5.0 s of
    stage 1 where a refit after it takes 7). Cosine schedules only: a plateau's rates are known at the end."""
    with one_blas_thread():  # for all of them: the workers run `_fit_head`, which leaves the count as it is
        return _fit_candidates(candidates, x_train, y_train, x_val, y_val, progress or NoProgress(), x_full, y_full)


class _Shadow:
    """A candidate's refit on train + validation, trained beside the candidate before its stopping epoch is known:
    it snapshots its weights after every epoch that could still turn out to be the candidate's best (none before
    the candidate's best so far), and stops once it has passed the candidate's final best epoch."""

    def __init__(self) -> None:
        self.best_so_far = 0  # the candidate's best epoch so far (epochs before it can no longer be chosen)
        self.epochs: int | None = None  # the candidate's best epoch + 1 once it has finished; 0: it diverged
        self.states: dict[int, dict[str, np.ndarray]] = {}
        self.finished = threading.Event()  # set when the candidate is done, `epochs` known (or not: it failed)

    def watch(self, epoch: int, head: HeadParams, history: History) -> bool:  # the candidate's after_epoch
        self.best_so_far = max(self.best_so_far, history.best_epoch)
        return False

    def after_epoch(self, epoch: int, head: HeadParams, history: History) -> bool:  # the shadow's own
        target, floor = self.epochs, self.best_so_far
        if target is None or epoch + 1 <= target:
            self.states[epoch] = head.state_dict()
        for old in [e for e in self.states if e < floor]:
            del self.states[old]
        return target is not None and epoch + 1 >= target

    def run(self, head_cfg, cfg, x, y, head: HeadParams) -> HeadParams | None:
        """The refitted head at the candidate's epoch count, or None (the candidate or the refit diverged)."""
        head.set_standardization(x)
        try:
            _fit_head(head_cfg, cfg, x, y, None, None, None, head, stop_after=self.epochs or None,
                      after_epoch=self.after_epoch)
        except _Diverged:
            return None
        # On a loaded machine the refit can run all its epochs before its candidate has chosen one: it waits for
        # the count (the candidates were queued first, so each is running or done and this ends).
        self.finished.wait()
        if not self.epochs or self.epochs - 1 not in self.states:
            return None
        head.load_state_dict(self.states[self.epochs - 1])
        return head


def _candidate(shadow: _Shadow | None, *args) -> tuple[HeadParams, History, tuple[float, ...]] | _Diverged:
    """One candidate's fit, telling its shadow how it went (whatever happens: the shadow waits to hear)."""
    try:
        try:
            out = _fit_head(*args, after_epoch=shadow.watch if shadow else None)
        except _Diverged as diverged:
            out = diverged
        if shadow is not None:
            shadow.epochs = 0 if isinstance(out, _Diverged) else out[1].best_epoch + 1
        return out
    finally:
        if shadow is not None:
            shadow.finished.set()


def _fit_candidates(candidates, x_train, y_train, x_val, y_val, progress: Progress, x_full=None,
                    y_full=None) -> FittedHead:
    heads = [fresh_head(head_cfg, cfg.seed) for head_cfg, cfg in candidates]
    for head in heads:
        prior_bias(head, y_train)
    heads[0].set_standardization(x_train)  # two passes over the features: once, since they are the same for all
    for head in heads[1:]:
        head.mean, head.std = heads[0].mean, heads[0].std
    progress.start("training head" if len(candidates) == 1 else f"training {len(candidates)} heads",
                   sum(cfg.epochs for _, cfg in candidates))
    shared = _AdvanceOnly(progress)
    refitting = x_full is not None and all(cfg.schedule == "cosine" for _, cfg in candidates)
    shadows = [_Shadow() if refitting else None for _ in candidates]
    twins = [fresh_head(head_cfg, cfg.seed) for head_cfg, cfg in candidates] if refitting else []
    for twin in twins:
        prior_bias(twin, y_full)
    # Under torchrun, one after another in this thread: each fit's collectives in one order on every rank.
    with distributed.executor(min(len(candidates), cpu_threads())) as pool:
        jobs = [pool.submit(_candidate, shadow, head_cfg, cfg, x_train, y_train, x_val, y_val, shared, head)
                for (head_cfg, cfg), head, shadow in zip(candidates, heads, shadows)]
        # Queued behind the candidates, slowest (widest) first: a worker done with a fast candidate takes the
        # slow one's shadow while the slow candidate still runs.
        order = sorted(range(len(twins)), key=lambda i: -_width(candidates[i][0]))
        refits = {i: pool.submit(shadows[i].run, *candidates[i], x_full, y_full, twins[i]) for i in order}
        outcomes = [job.result() for job in jobs]
        refitted = {i: job.result() for i, job in refits.items()}
    progress.finish()
    diverged = [o for o in outcomes if isinstance(o, _Diverged)]
    if len(diverged) == len(outcomes):
        raise ConfigError(str(diverged[0]))
    for (head_cfg, _), outcome in zip(candidates, outcomes):
        if isinstance(outcome, _Diverged):
            log.warning("head candidate (hidden %s) dropped: %s", list(head_cfg.hidden), outcome)
    kept = [i for i, o in enumerate(outcomes) if not isinstance(o, _Diverged)]
    refit_of = [refitted.get(i) for i in kept]
    candidates, fits = [candidates[i] for i in kept], [outcomes[i] for i in kept]
    losses = [min(history.val_loss, default=math.inf) for _, history, _ in fits]
    best = min(range(len(fits)), key=lambda i: (losses[i], i))
    if len(fits) > 1:
        log.info("head candidates' validation losses %s: kept %s", [round(v, 4) for v in losses], candidates[best][0])
    described = tuple(HeadCandidate(c.hidden, c.dropout, loss) for (c, _), loss in zip(candidates, losses))
    return FittedHead(fits[best][0], fits[best][1], candidates[best][1], described, fits[best][2], refit_of[best])


def _width(head_cfg: HeadConfig) -> int:
    """What a step of this head costs, roughly: the widths its input rows are multiplied into."""
    return head_cfg.hidden[0] if head_cfg.hidden else head_cfg.n_classes


def refit_full(head_cfg: HeadConfig, cfg: TrainConfig, x: np.ndarray, y: np.ndarray, epochs: int,
               epoch_lrs: tuple[float, ...] = (), progress: Progress | None = None,
               head: HeadParams | None = None) -> tuple[HeadParams, History]:
    """scikit-learn's `refit` (AutoGluon's `refit_full`): a fresh head with the chosen settings, drawn from the same
    seed, standardised for and trained on all of `x` (train + validation) for the `epochs` validation chose, with
    the schedule of that run (cosine over `cfg.epochs`, or the plateau's recorded rates) and nothing to validate
    on. A diverged refit is a ConfigError, as in `fit_head`. `head`: one `fresh_head` drew beforehand (from
    `cfg.seed`), for refits that run in threads side by side."""
    if head is not None:
        head.set_standardization(x)
    with one_blas_thread():
        try:
            return _fit_head(head_cfg, cfg, x, y, None, None, progress, head, stop_after=epochs,
                             replay_lrs=epoch_lrs if cfg.schedule == "plateau" else ())[:2]
        except _Diverged as diverged:
            raise ConfigError(str(diverged)) from None


def _standardized_rows(head: HeadParams, features: np.ndarray):
    """A function from row indices (an array or a slice) to standardised float32 rows. Features in memory are
    standardised once, the fastest; a memory map is read and standardised batch by batch, so that memory does not
    grow with the data set."""
    if isinstance(features, np.memmap):
        return lambda which: head.standardize(features[which])
    whole = head.standardize(features)
    return lambda which: whole[which]
