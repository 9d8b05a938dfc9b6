"""The engine is decided once per command (`runtime.frozen.resolve_engine`): train, load + predict, evaluate and
check each resolve it once and carry the choice, instead of asking the backbone for its key, its kind and its
engine, each working the same path out again. Counted on the default engine setting ("auto")."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_models import TINY_BACKBONE
from headstart import ImageClassifier
from headstart.runtime import frozen as frozen_module
from headstart.tasks.check import check_folder


@pytest.fixture
def resolved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = frozen_module.resolve_engine

    def counting(frozen, device, setting):
        calls.append(setting)
        return real(frozen, device, setting)

    monkeypatch.setattr(frozen_module, "resolve_engine", counting)
    return calls


def test_each_command_resolves_the_engine_once(resolved, tiny_weights, tiny_cache, image_folder: Path,
                                               tmp_path: Path) -> None:
    clf = ImageClassifier(TINY_BACKBONE, weights=tiny_weights, epochs=5, device="cpu", strategy="head")
    clf.fit(image_folder)
    assert resolved == ["auto"], "train"
    clf.save(tmp_path / "model")

    resolved.clear()
    loaded = ImageClassifier.load(tmp_path / "model")
    loaded.predict(sorted(image_folder.rglob("*.jpg"))[:3])
    loaded.evaluate(image_folder)
    assert resolved == ["fp32"], "load, predict and evaluate"  # the engine the model recorded (tests pin fp32)

    resolved.clear()
    check_folder(image_folder, backbone=TINY_BACKBONE, weights=tiny_weights, device="cpu")
    assert resolved == ["auto"], "check"
