"""train.config: TrainConfig refuses bad values."""

from __future__ import annotations

import pytest

from headstart.records import TrainConfig


@pytest.mark.parametrize("kwargs, needle", [
    (dict(schedule="step"), "schedule"),
    (dict(schedule="Cosine"), "schedule"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=0.0), "lr"),
])
def test_train_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**kwargs)
