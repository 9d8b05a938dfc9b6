"""Likely label errors: cleanlab's ranking of out-of-fold probabilities finds the labels flipped on purpose."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import blobs
from headstart.evaluate.crossval import out_of_fold_proba
from headstart.evaluate.labels import find_label_errors, suspect_ranking


def test_suspect_ranking_puts_contradicted_labels_first() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1] * 3)
    proba = np.where(labels[:, None] == np.arange(2), 0.9, 0.1)
    proba[[8, 19]] = [[0.02, 0.98], [0.97, 0.03]]  # rows 8 and 19 say the other class, confidently
    order, flagged = suspect_ranking(labels, proba)
    assert sorted(order.tolist()) == list(range(len(labels)))  # every row ranked once
    assert set(order[:2].tolist()) == {8, 19} and flagged >= 2


def test_flipped_labels_are_found(tmp_path: Path) -> None:
    x, y = blobs(30, spread=0.5)
    rng = np.random.default_rng(3)
    flipped = rng.choice(len(y), 9, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    paths = [tmp_path / f"{i}.jpg" for i in range(len(y))]
    issues = find_label_errors(x, noisy, paths, ["a", "b", "c"])
    found = {int(i.path.stem) for i in issues}
    assert len(found & set(flipped.tolist())) >= 4  # cleanlab flags conservatively...
    assert len(found & set(flipped.tolist())) >= 0.8 * len(found)  # ...and what it flags is mostly flipped
    proba, _ = out_of_fold_proba(x, noisy, 3)
    order, _ = suspect_ranking(noisy, proba)
    assert len(set(order[:14].tolist()) & set(flipped.tolist())) >= 7  # the ranking's top 15 % holds most
    by_path = {int(i.path.stem): i for i in issues}
    for i in found & set(flipped.tolist()):
        assert by_path[i].given == "abc"[noisy[i]] and by_path[i].suggested == "abc"[y[i]]


def test_too_few_images_find_nothing_rather_than_fail(tmp_path: Path) -> None:
    x, y = blobs(1, n_classes=3)
    assert find_label_errors(x, y, [tmp_path / f"{i}" for i in range(3)], ["a", "b", "c"]) == []
