"""What stage 2's memory is made of, on the tiny backbone: an epoch reads its views of the boundary store without
mapping the store's file into the process, and computes each batch's gradient a micro-batch at a time, the same
gradient as the whole batch at once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from headstart.cache.boundary import StoreArray  # noqa: E402
from headstart.heads.module import Head  # noqa: E402
from headstart.train import finetune as ft  # noqa: E402
from headstart.records import FinetuneConfig  # noqa: E402
from helpers_finetune import _head_for, _net  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest: the tiny model's steps, one thread


def _rss_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def _setup(tiny_weights, cfg: FinetuneConfig, n: int):
    net = _net(tiny_weights)
    head = _head_for(net)
    head = Head(dataclasses.replace(head.cfg, dropout=0.0))  # no dropout: two runs draw no masks to tell apart
    torch.manual_seed(0)
    boundary = ft.boundary_for(net, cfg.unfreeze)
    units = ft.set_trainable(net, boundary)
    place = ft._Placement(cfg)
    place.module(net)
    place.module(head)
    loop = ft._Loop(*ft._optimizer(net, head, units, cfg, n), np.random.default_rng(0),
                    keep=ft.BestTracker(), patience=ft.BestTracker(patience=3))
    ft.set_modes(net, head, units, cfg.train_bn)
    return net, head, boundary, loop, place


def test_an_epoch_reads_its_views_of_the_store_without_mapping_the_file(tiny_weights, tmp_path, monkeypatch):
    n, views, side = 64, 4, 160
    path = tmp_path / "train.acts.npy"
    rng = np.random.default_rng(0)
    np.save(path, rng.standard_normal((n, views, 3, side, side)).astype(np.float16))  # 150 KiB a view, 9.4 MiB a pass
    cfg = FinetuneConfig(unfreeze="all", views=views, epochs=2, batch_size=32)
    net, head, boundary, loop, place = _setup(tiny_weights, cfg, n)
    train = ft.StoredViews(StoreArray(np.load(path, mmap_mode="r")), StoreArray(np.zeros((n, views, 0), np.float32)),
                           np.arange(n) % 3)
    resident = []
    real_release = ft.release
    monkeypatch.setattr(ft, "release", lambda arr: (resident.append(_rss_file_kib()), real_release(arr)))
    ft._train_epoch(net, head, boundary, cfg, train, 0, loop, place)  # warm-up: torch maps its kernels' code
    before = _rss_file_kib()
    ft._train_epoch(net, head, boundary, cfg, train, 1, loop, place)
    pass_kib = n * 3 * side * side * 2 // 1024
    assert resident[-1] - before < pass_kib // 4, (before, resident, pass_kib)  # mapped reads: >= pass_kib


def test_a_batch_trained_in_micro_batches_takes_the_whole_batch_step(tiny_weights, monkeypatch):
    n = 40  # a short last batch too: 32 + 8
    cfg = FinetuneConfig(unfreeze=2, views=1, epochs=1, batch_size=32)
    rng = np.random.default_rng(1)
    states = []
    for micro in (32, 8):
        monkeypatch.setattr(ft, "MICRO_BATCH", micro)
        net, head, boundary, loop, place = _setup(tiny_weights, cfg, n)
        with torch.no_grad():
            acts, taps = net.forward_bottom(torch.from_numpy(rng.standard_normal((2, 3, 64, 64)).astype(np.float32)),
                                            boundary)
        if not states:  # the same inputs for both runs
            data = ft.StoredViews(np.repeat(acts.numpy()[None], n // 2, 0).reshape(n, 1, *acts.shape[1:]) +
                                  rng.standard_normal((n, 1, *acts.shape[1:])).astype(np.float32),
                                  np.repeat(taps.numpy()[None], n // 2, 0).reshape(n, 1, -1), np.arange(n) % 3)
        loss = ft._train_epoch(net, head, boundary, cfg, data, 0, loop, place)
        states.append((loss, {k: v.clone() for k, v in net.state_dict().items()}, head.state_dict()))
    (loss_a, net_a, head_a), (loss_b, net_b, head_b) = states
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    moved = [k for k in net_a if not torch.equal(net_a[k], _net(tiny_weights).state_dict()[k])]
    assert moved, "nothing trained"
    for k in net_a:
        torch.testing.assert_close(net_a[k], net_b[k], rtol=1e-4, atol=1e-5)
    for k in head_a:
        torch.testing.assert_close(head_a[k], head_b[k], rtol=1e-4, atol=1e-5)
