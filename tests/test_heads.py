"""heads: the numpy inference agrees with the torch head (hidden layers too), and the standardisation
statistics streamed in chunks match numpy's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_models import blobs
from headstart.heads.config import HeadConfig, head_logits_numpy
from headstart.heads.module import Head
from headstart.records import TrainConfig
from headstart.train.fit_head import fit_head


def test_a_head_fitted_in_numpy_loads_into_the_torch_head_and_predicts_the_same():
    x, y = blobs(20, seed=1)
    fitted, _ = fit_head(HeadConfig(x.shape[1], 3, hidden=(16, 8)), TrainConfig(epochs=3, batch_size=16), x, y)
    state = fitted.state_dict()
    head = Head(fitted.cfg)
    head.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})  # strict: every key, every shape
    with torch.no_grad():
        expected = head.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(head_logits_numpy(state, fitted.cfg, x), expected, atol=1e-4)
    np.testing.assert_allclose(fitted.logits(fitted.standardize(x)), expected, atol=1e-4)


@pytest.mark.parametrize("hidden,seed", [((), 0), ((64,), 3), ((16, 8), 12345)])
def test_a_fresh_numpy_head_is_what_torch_draws_after_manual_seed(hidden, seed):
    """Bit for bit: a seed gives the head it gave when stage 1 trained in torch."""
    from headstart.heads.params import HeadParams

    cfg = HeadConfig(380, 5, hidden=hidden)
    torch.manual_seed(seed)
    want = {k: v.numpy() for k, v in Head(cfg).state_dict().items() if k.startswith("layers.")}
    got = HeadParams.fresh(cfg, seed).state_dict()
    assert {k for k in got if k.startswith("layers.")} == set(want)
    for k, v in want.items():
        assert got[k].dtype == np.float32 and np.array_equal(got[k], v), k


def test_standardization_statistics_streamed_in_chunks_match_numpy():
    from headstart.heads.params import HeadParams

    x, _ = blobs(50, seed=2)
    head = HeadParams.fresh(HeadConfig(x.shape[1], 3), 0)
    head.set_standardization(x, chunk=7)
    np.testing.assert_allclose(head.mean, x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(head.std, x.astype(np.float64).std(0) + 1e-6, rtol=1e-5)
