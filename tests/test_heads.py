"""heads: the numpy inference agrees with the torch head (hidden layers too), and the standardisation
statistics streamed in chunks match numpy's."""

from __future__ import annotations

import numpy as np
import torch

from conftest import blobs
from headstart.heads.config import HeadConfig, head_logits_numpy
from headstart.heads.module import Head
from headstart.train.config import TrainConfig
from headstart.train.fit_head import fit_head


def test_hidden_layers_numpy_inference_matches_torch():
    x, y = blobs(20, seed=1)
    head, _ = fit_head(HeadConfig(x.shape[1], 3, hidden=(16, 8)), TrainConfig(epochs=3, batch_size=16), x, y)
    state = {k: v.numpy() for k, v in head.state_dict().items()}
    with torch.no_grad():
        expected = head(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(head_logits_numpy(state, head.cfg, x), expected, atol=1e-4)


def test_standardization_statistics_streamed_in_chunks_match_numpy():
    x, _ = blobs(50, seed=2)
    head = Head(HeadConfig(x.shape[1], 3))
    head.set_standardization(x, chunk=7)
    np.testing.assert_allclose(head.mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(head.std.numpy(), x.astype(np.float64).std(0) + 1e-6, rtol=1e-5)
