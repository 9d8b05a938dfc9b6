"""The refit that trains beside a head candidate (`fit_head._Shadow`) keeps its weights at the candidate's epoch
count even when it runs all its epochs before the candidate has finished: on a loaded machine (CI's two cores
shared with the rest of the suite) it did, and `fit_best_head` came back without its refit."""

from __future__ import annotations

import threading
import time

import numpy as np

from helpers_models import blobs
from headstart.heads.config import HeadConfig
from headstart.records import TrainConfig
from headstart.train import fit_head
from headstart.train.fit_head import refit_full


def test_a_refit_faster_than_its_candidate_waits_for_the_epoch_count() -> None:
    x, y = blobs(20, seed=1)
    head_cfg, cfg = HeadConfig(x.shape[1], 3), TrainConfig(epochs=6, seed=0)
    shadow = fit_head._Shadow()
    got: list = []
    runner = threading.Thread(target=lambda: got.append(shadow.run(head_cfg, cfg, x, y,
                                                                   fit_head.fresh_head(head_cfg, cfg.seed))))
    runner.start()
    time.sleep(1.0)  # the refit has run its six epochs; its candidate has not reported yet
    shadow.epochs = 4
    shadow.finished.set()
    runner.join(timeout=30)
    assert got and got[0] is not None
    want, _ = refit_full(head_cfg, cfg, x, y, 4, head=fit_head.fresh_head(head_cfg, cfg.seed))
    for name, value in want.state_dict().items():
        np.testing.assert_array_equal(got[0].state_dict()[name], value)
