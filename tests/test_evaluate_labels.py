"""Likely label errors: cleanlab's ranking of out-of-fold probabilities finds the labels flipped on purpose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from helpers_models import blobs
from headstart.train.crossval import out_of_fold_proba
from headstart.evaluate.labels import find_label_errors, out_of_fold_linear, principal_coordinates, suspect_ranking


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


def test_label_errors_do_not_load_torch() -> None:
    """`check`'s ranking fits its folds with scikit-learn, already loaded with cleanlab: loading torch for five
    linear heads cost flowers' check 2 s of its 15."""
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from helpers_models import blobs; "
            "from headstart.evaluate.labels import find_label_errors; x, y = blobs(20); y[:3] = (y[:3] + 1) % 3; "
            "find_label_errors(x, y, [Path(str(i)) for i in range(len(y))], ['a', 'b', 'c']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_principal_coordinates_keep_the_leading_variance() -> None:
    rng = np.random.default_rng(0)
    # A decaying spectrum, as features' is, in axes that are no feature's own.
    x = (rng.normal(size=(300, 80)) * 0.9 ** np.arange(80)) @ np.linalg.qr(rng.normal(size=(80, 80)))[0]
    z = principal_coordinates(x.astype(np.float32), rank=10)
    s = np.linalg.svd((x - x.mean(0)) / x.std(0), compute_uv=False)
    captured, best = float((z ** 2).sum()), float((s[:10] ** 2).sum())
    assert z.shape == (300, 10) and 0.999 * best <= captured <= best * (1 + 1e-4)
    few = principal_coordinates(x[:, :6].astype(np.float32), rank=10)  # no more features than the rank: all kept
    assert few.shape == (300, 6) and np.allclose(few.std(0), 1.0, atol=1e-4)


def test_a_fold_left_with_one_class_still_gives_probabilities() -> None:
    x, _ = blobs(3, n_classes=2)
    y = np.array([0, 0, 0, 0, 0, 1])  # the fold holding the lone 1 trains on class 0 alone
    proba, fold_of = out_of_fold_linear(x, y, 2, folds=3)
    assert proba.shape == (6, 2) and np.allclose(proba.sum(1), 1.0) and len(set(fold_of.tolist())) == 3
    assert proba[5, 0] == 1.0  # all a head trained on class 0 alone could say
