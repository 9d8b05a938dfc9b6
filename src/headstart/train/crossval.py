"""k-fold cross-validation fits of the head on cached features: each fold trained the way `train` trains the head
(see `evaluate.crossval` for the folds, the summary and the 95 % interval, which are math only).

Each fold holds out a stratified 20 % of its training rows for early stopping and the choice between candidates,
so the held-out fold chose nothing. On cached features a fold takes well under a second (hymenoptera, 244
photos) to a few seconds (flowers, 4,317).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from headstart.evaluate.crossval import FOLDS, fold_count, kept_groups, stratified_folds, summarise
from headstart.heads.config import HeadConfig, head_proba
from headstart.records import CrossValidation, TrainConfig
from headstart.runtime.device import cpu_threads, one_blas_thread
from headstart.train import policy
from headstart.train.fit_head import fit_best_head, fresh_head, refit_full

INNER_VAL = 0.2  # the share of each fold's training rows held out for early stopping, as `train`'s --val-split


def out_of_fold_proba(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = FOLDS,
                      seed: int = 0, hidden: tuple[int, ...] | str = "auto", dropout: float = 0.2,
                      train_config: TrainConfig | None = None, groups: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, fold of each row): every row's class probabilities from a head that never saw it; with
    `groups`, a group's rows share a fold (and a side of each fold's early-stopping split)."""
    k = fold_count(labels, folds)
    fold_of = stratified_folds(labels, k, seed, groups)
    proba = np.zeros((len(labels), n_classes), np.float32)
    for fold in range(k):
        test = np.flatnonzero(fold_of == fold)
        train = np.flatnonzero(fold_of != fold)
        proba[test] = _fold_proba(features, labels, n_classes, train, test, hidden, dropout,
                                  train_config or TrainConfig(seed=seed), seed + fold,
                                  None if groups is None else groups[train])
    return proba, fold_of


def _fold_proba(features, labels, n_classes, train, test, hidden, dropout, cfg: TrainConfig, seed: int,
                groups: np.ndarray | None = None):
    """One fold: the head fitted as `train` fits it on the training rows, applied to the test rows."""
    inner = stratified_folds(labels[train], max(2, round(1 / INNER_VAL)), seed, groups) == 0
    fit_rows, val_rows = np.sort(train[~inner]), np.sort(train[inner])
    x_fit, y_fit = np.asarray(features[fit_rows], np.float32), labels[fit_rows]
    x_val, y_val = np.asarray(features[val_rows], np.float32), labels[val_rows]
    candidates = policy.head_candidates(hidden, dropout, HeadConfig(features.shape[1], n_classes), cfg,
                                        len(y_fit), len(y_val) > 0)
    fitted = fit_best_head(candidates, x_fit, y_fit, x_val, y_val)
    return head_proba(fitted.head.cfg, fitted.state, np.asarray(features[test], np.float32))  # `test` is sorted


def cross_validate(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = FOLDS, seed: int = 0,
                   hidden: tuple[int, ...] | str = "auto", dropout: float = 0.2,
                   train_config: TrainConfig | None = None, groups: np.ndarray | None = None) -> CrossValidation:
    """k-fold accuracy of the head on `features`, with its 95 % interval; with `groups`, a group's rows share
    a fold."""
    proba, fold_of = out_of_fold_proba(features, labels, n_classes, folds, seed, hidden, dropout, train_config,
                                       groups)
    return replace(summarise(proba.argmax(1) == labels, fold_of), groups=kept_groups(groups, fold_of))


def cross_validate_settings(features: np.ndarray, labels: np.ndarray, head_cfg: HeadConfig, train_config: TrainConfig,
                            epochs: int, epoch_lrs: tuple[float, ...] = (), folds: int = FOLDS,
                            seed: int = 0, groups: np.ndarray | None = None) -> CrossValidation:
    """k-fold accuracy of one head at settings a validation split already chose (its config, its epoch count,
    its plateau rates): each fold a fresh head `refit_full` trains on the other folds with no early stopping,
    scored on its own fold. What `train` reports for the head it ships: the head is refitted the same way on all
    of these rows. The settings were chosen on part of these rows, so the figure leans optimistic by what that
    choice could overfit (two candidates and an epoch count); `cross_validate` re-chooses inside every fold
    instead, at about five times the cost. Folds train side by side, one thread each, like `fit_best_head`'s
    candidates. With `groups`, a group's rows share a fold."""
    k = fold_count(labels, folds)
    fold_of = stratified_folds(labels, k, seed, groups)
    untempered = replace(head_cfg, temperature=1.0)  # the argmax does not depend on it
    configs = [replace(train_config, seed=train_config.seed + fold) for fold in range(k)]
    drawn = [fresh_head(untempered, cfg.seed) for cfg in configs]

    def one(fold: int) -> np.ndarray:
        train, test = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        head, _ = refit_full(untempered, configs[fold], np.asarray(features[train], np.float32), labels[train],
                             epochs, epoch_lrs, head=drawn[fold])
        state = head.state_dict()
        return head_proba(untempered, state, np.asarray(features[test], np.float32)).argmax(1) == labels[test]

    hits = np.zeros(len(labels), bool)
    with one_blas_thread(), ThreadPoolExecutor(max_workers=min(k, cpu_threads())) as pool:  # the process's count
        for fold, fold_hits in enumerate(pool.map(one, range(k))):
            hits[fold_of == fold] = fold_hits
    return replace(summarise(hits, fold_of), rows="train+val", groups=kept_groups(groups, fold_of))
