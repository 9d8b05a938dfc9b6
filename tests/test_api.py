"""ImageClassifier end to end on generated photos, with the tiny random-weight backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers_cli import assert_one_line
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE
from headstart import ImageClassifier
from headstart.errors import DataError
from headstart.data.scan import scan_folder
from headstart.records import Evaluation
from headstart.records import EvaluationResult, History

CLASSES = ["cat", "dog", "fish"]


@pytest.fixture
def make_clf(tiny_weights, tiny_cache):
    def make(**kwargs) -> ImageClassifier:
        return ImageClassifier(TINY_BACKBONE, weights=tiny_weights, **{"epochs": 15, "device": "cpu", **kwargs})

    return make


@pytest.fixture
def fitted(make_clf, image_folder) -> ImageClassifier:
    return make_clf().fit(image_folder)


def _images(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


def test_fit_returns_fitted_self(make_clf, image_folder):
    clf = make_clf()
    assert clf.fit(image_folder) is clf
    assert clf.classes_ == CLASSES
    assert isinstance(clf.history_, History)
    assert 1 <= len(clf.history_.train_loss) <= 15 and len(clf.history_.val_loss) == len(clf.history_.train_loss)
    assert isinstance(clf.val_metrics_, Evaluation) and clf.val_metrics_.n == 3  # one val image per class
    assert clf.test_metrics_ is None
    assert clf.counts_["train"] == {"cat": 5, "dog": 5, "fish": 5}
    assert clf.cached_ == 0 and clf.skipped_ == []
    assert clf.head_config_.in_features == 400 and clf.head_config_.n_classes == 3


def test_classes_are_sorted_whatever_the_folder_order(make_clf, tmp_path):
    root = make_image_folder(tmp_path / "p", classes=("zebra", "ant", "mole"), per_class=4)
    assert make_clf(epochs=2).fit(root).classes_ == ["ant", "mole", "zebra"]


def test_refit_reuses_cached_features(make_clf, image_folder):
    make_clf(epochs=2).fit(image_folder)
    again = make_clf(epochs=2).fit(image_folder)
    assert again.cached_ == 18


def test_predict_files_and_folder(fitted, image_folder):
    files = _images(image_folder)
    by_file = fitted.predict(files)
    assert len(by_file) == len(files) and set(by_file) <= set(CLASSES)
    truth = [p.parent.name for p in files]
    # Colour decides the class; even random backbone features separate these well.
    assert np.mean([a == b for a, b in zip(by_file, truth)]) >= 0.8
    assert fitted.predict([image_folder]) == by_file
    assert fitted.predict(image_folder) == by_file  # a lone folder, not iterated character by character
    proba = fitted.predict_proba(files[:4])
    assert proba.shape == (4, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert [CLASSES[i] for i in proba.argmax(1)] == by_file[:4]


def test_predict_table_reports_unreadable_files_and_predicts_the_rest(fitted, image_folder, tmp_path):
    good = _images(image_folder)[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    missing = tmp_path / "missing.jpg"
    rows = fitted.predict_table([good[0], broken, good[1], missing, good[2]], top_k=2)
    by_path = {r.path: r for r in rows}
    assert set(by_path) == {*good, broken, missing}
    for p in (broken, missing):
        assert by_path[p].label is None and by_path[p].error
        assert "\n" not in by_path[p].error
    assert "no such file" in by_path[missing].error
    expected = fitted.predict(good)
    for p, label in zip(good, expected):
        row = by_path[p]
        assert row.error is None and row.label == label
        assert len(row.top_k) == 2 and row.top_k[0] == (label, row.confidence)
        assert row.top_k[0][1] >= row.top_k[1][1]
    # Readable images keep the order they were given in.
    assert [r.path for r in rows if r.error is None] == good


def test_predict_proba_refuses_an_unreadable_image(fitted, image_folder, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not a png")
    with pytest.raises(DataError) as err:
        fitted.predict_proba([_images(image_folder)[0], broken])
    assert_one_line(str(err.value), "broken.png", "predict_table")


def test_predict_lines_up_with_the_inputs(fitted, image_folder, tmp_path):
    """A list in gives a list of the same length, in the same order, out: a folder expands in place (sorted) to its
    images, a path given twice is predicted twice, and an input without a result is an error naming it."""
    files = _images(image_folder)
    one = {f: label for f, label in zip(files, fitted.predict(files))}
    cats = sorted((image_folder / "cat").glob("*.jpg"))
    inputs = [files[-1], image_folder / "cat", files[0], files[-1]]
    expected = [one[files[-1]], *(one[c] for c in cats), one[files[0]], one[files[-1]]]
    assert fitted.predict(inputs) == expected
    proba = fitted.predict_proba(inputs)
    assert proba.shape == (len(expected), 3)
    np.testing.assert_allclose(proba[0], proba[-1])
    missing, empty = tmp_path / "missing.jpg", tmp_path / "empty"
    empty.mkdir()
    for bad in (missing, empty):
        for method in (fitted.predict, fitted.predict_proba):
            with pytest.raises(DataError) as err:
                method([files[0], bad, files[1]])
            assert_one_line(str(err.value), str(bad))


def test_predict_table_has_one_row_per_input_in_input_order(fitted, image_folder, tmp_path):
    files = _images(image_folder)
    missing, empty, broken = tmp_path / "missing.jpg", tmp_path / "empty", tmp_path / "broken.jpg"
    empty.mkdir()
    broken.write_bytes(b"not a jpeg")
    cats = sorted((image_folder / "cat").glob("*.jpg"))
    rows = fitted.predict_table([files[-1], missing, image_folder / "cat", empty, broken, files[-1]])
    assert [r.path for r in rows] == [files[-1], missing, *cats, empty, broken, files[-1]]
    assert [r.error is None for r in rows] == [True, False, *[True] * len(cats), False, False, True]
    assert rows[0].label == rows[-1].label == fitted.predict([files[-1]])[0]


def test_score_on_a_separate_val_folder(make_clf, split_folder):
    clf = make_clf().fit(split_folder)
    assert clf.counts_["val"] == {"cat": 2, "dog": 2, "fish": 2}
    score = clf.score(split_folder / "val")
    assert 0.0 <= score <= 1.0
    # score() measures the same images as the validation split did during fit.
    assert score == pytest.approx(clf.val_metrics_.accuracy)
    val_files = _images(split_folder / "val")
    predicted = clf.predict(val_files)
    assert score == pytest.approx(np.mean([p == f.parent.name for p, f in zip(predicted, val_files)]))
    result = clf.evaluate(split_folder / "val")
    evaluation = result.metrics
    assert isinstance(result, EvaluationResult) and evaluation.n == 6 and result.skipped == ()
    assert evaluation.classes == tuple(CLASSES)


def test_evaluate_maps_a_subset_of_classes(fitted, tmp_path):
    subset = make_image_folder(tmp_path / "subset", classes=("cat", "dog"), per_class=3, seed=5)
    (subset / "fish").mkdir()
    make_image_folder(tmp_path / "tmp-fish", classes=("fish",), per_class=2, seed=6)
    for f in (tmp_path / "tmp-fish" / "fish").iterdir():
        f.rename(subset / "fish" / f.name)
    evaluation = fitted.evaluate(subset).metrics
    assert evaluation.support.tolist() == [3, 3, 2]


@pytest.mark.parametrize("method", ["predict", "predict_proba", "predict_table", "score", "save"])
def test_unfitted_classifier_refuses(make_clf, image_folder, method):
    with pytest.raises(DataError) as err:
        getattr(make_clf(), method)(image_folder)
    assert_one_line(str(err.value), "not fitted")


def test_class_with_only_corrupt_images_is_named(make_clf, tmp_path):
    root = make_image_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=5)
    (root / "fish").mkdir()
    for i in range(5):
        (root / "fish" / f"fish_{i}.jpg").write_bytes(b"\xff\xd8\xff garbage " + bytes([i]) * 64)
    with pytest.raises(DataError) as err:
        make_clf().fit(root)
    assert_one_line(str(err.value), "fish")
    assert "cat" not in str(err.value) and "dog" not in str(err.value)


def test_some_corrupt_images_are_skipped_not_fatal(make_clf, image_folder):
    bad = image_folder / "dog" / "dog_000.jpg"
    bad.write_bytes(b"\xff\xd8\xff definitely not a jpeg")
    clf = make_clf(epochs=2).fit(image_folder)
    assert [p for p, _ in clf.skipped_] == [bad]
    assert clf.skipped_[0][1] and "\n" not in clf.skipped_[0][1]
    assert clf.classes_ == CLASSES
    # The counts are of images trained and validated on: the unreadable one is not among them.
    listed = scan_folder(image_folder, val_split=clf.val_split, seed=clf.seed)
    bad_split = next(s.split for s in listed.samples if s.path == bad)
    assert clf.counts_[bad_split]["dog"] == listed.class_counts(bad_split)["dog"] - 1
    assert sum(map(sum, (c.values() for c in clf.counts_.values()))) == len(listed.samples) - 1


def test_evaluate_refuses_unknown_classes(fitted, tmp_path):
    other = make_image_folder(tmp_path / "other", classes=("cat", "horse"), per_class=2)
    with pytest.raises(DataError) as err:
        fitted.evaluate(other)
    assert_one_line(str(err.value), "horse")
    with pytest.raises(DataError):
        fitted.score(other)


def test_get_params_round_trip(make_clf):
    clf = make_clf(hidden=[8], lr=0.01)
    params = clf.get_params()
    # stored as given (scikit-learn: __init__ only stores; fit checks and converts)
    assert params["hidden"] == [8] and params["lr"] == 0.01 and params["backbone"] == TINY_BACKBONE
    assert ImageClassifier(**params).get_params() == params


@pytest.mark.parametrize(
    "setting, needle",
    [({"schedule": "linear"}, "schedule"), ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"),
     ({"hidden": "big"}, "hidden"), ({"strategy": "magic"}, "strategy")],
)
def test_bad_settings_fail_before_any_work(make_clf, image_folder, isolated_cache, setting, needle):
    with pytest.raises(DataError) as err:
        make_clf(**setting).fit(image_folder)
    assert_one_line(str(err.value), needle)
    assert not (isolated_cache / "features").exists()  # nothing was extracted


# --- a diverged training is never a silently saved model ---------------------------------------------------------

def test_a_diverged_head_is_a_clear_error_not_a_model(make_clf, image_folder, tmp_path):
    from headstart.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        make_clf(lr=1e20, epochs=6).fit(image_folder)
    assert_one_line(str(err.value), "diverged", "learning rate")


def test_a_diverged_fine_tuning_keeps_the_last_finite_weights_and_warns(tiny_weights, ft_cache, image_folder,
                                                                        caplog, one_torch_thread):
    import logging

    from helpers_finetune import finetune_classifier

    with caplog.at_level(logging.WARNING):
        clf = finetune_classifier(tiny_weights, finetune_lr=1e30, finetune_epochs=3).fit(image_folder)
    assert any("fine-tuning diverged" in r.getMessage() for r in caplog.records), caplog.text
    assert all(np.isfinite(v).all() for v in clf.head_state_.values())
    proba = clf.predict_proba(_images(image_folder)[:3])
    assert np.isfinite(proba).all()


def test_iter_table_streams_rows_chunk_by_chunk_in_input_order(fitted, image_folder, tmp_path, monkeypatch):
    """Rows come out STREAM_ROWS inputs at a time (memory flat for huge folders), the same rows as predict_table."""
    from headstart.serve import predictor

    monkeypatch.setattr(predictor, "STREAM_ROWS", 4)
    files = _images(image_folder)[:9]
    inputs = [*files[:5], tmp_path / "missing.jpg", *files[5:]]
    calls = []
    real = predictor.Predictor._batches
    monkeypatch.setattr(predictor.Predictor, "_batches",
                        lambda self, paths, advance=None: (calls.append(len(paths)), real(self, paths, advance))[1])
    rows = fitted.iter_table(inputs, top_k=2)
    first = next(rows)
    assert calls == [4] and first.path == inputs[0] and first.label  # nothing beyond the first chunk yet
    rest = [first, *rows]
    assert calls == [4, 3, 2]  # the missing file takes a row, not a prediction
    assert [r.path for r in rest] == inputs and rest[5].error == "no such file"
    assert [(r.path, r.label) for r in rest] == [(r.path, r.label) for r in fitted.predict_table(inputs, top_k=2)]
