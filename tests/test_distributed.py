"""runtime.distributed under torchrun: two processes train one model (rank 0 alone prints and writes it), which
matches the one-process model, and an error on one rank ends both at once with one message.

The torchrun runs are real (gloo on the CPU, two processes, the tiny backbone): `python -m torch.distributed.run`
is torchrun itself. Dropout is 0 in the comparison so that the two runs differ only by how sums are ordered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_images import make_image_folder
from helpers_models import TINY_BACKBONE, seed_tiny_export

torch = pytest.importorskip("torch")

from headstart.runtime import distributed

TIMEOUT_S = 240
RUN = ["--backbone", TINY_BACKBONE, "--strategy", "finetune", "--finetune-epochs", "2", "--epochs", "15",
       "--dropout", "0", "--hidden", "", "--views", "2"]


@pytest.fixture(scope="module")
def env(tiny_onnx, tmp_path_factory) -> dict[str, str]:
    """A cache seeded with the tiny backbone's export, two torch threads at most, no GPU."""
    cache = seed_tiny_export(tiny_onnx, tmp_path_factory.mktemp("ddp-cache"))
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**clean, "HEADSTART_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
            "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HEADSTART_DIST_TIMEOUT_S": "60"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "photos", per_class=8)


def _torchrun(*args, env, cwd, module=("-m", "headstart")) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *module, *map(str, args)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT_S)
    return proc, time.monotonic() - t0


def _head(model: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(model / "model.safetensors")).items() if k.startswith("head.")}


def test_two_processes_train_one_model_that_matches_the_one_process_run(photos, tiny_weights, env, tmp_path):
    one = subprocess.run([sys.executable, "-m", "headstart", "train", photos, "--out", tmp_path / "one",
                          "--weights", tiny_weights, *RUN], check=False, capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=TIMEOUT_S)
    assert one.returncode == 0, one.stdout + one.stderr
    two, _ = _torchrun("train", photos, "--out", tmp_path / "two", "--weights", tiny_weights, *RUN,
                       env=env, cwd=tmp_path)
    out = two.stdout + two.stderr
    assert two.returncode == 0, out
    assert out.count("headstart train") == 1, out  # one summary: rank 0's
    assert "Traceback" not in out and "Warning" not in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no second model anywhere
    assert not (tmp_path / "two" / "checkpoint").exists()

    meta = {name: json.loads((tmp_path / name / "headstart.json").read_text()) for name in ("one", "two")}
    assert meta["two"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert meta["one"]["distributed"] == {"world_size": 1, "backend": None}
    fits = {name: m["fit"] for name, m in meta.items()}
    assert fits["two"]["decision"]["kept"] == fits["one"]["decision"]["kept"] == "finetune"
    # The same steps on the same batches: losses and weights agree up to the order of the sums.
    for stage in ("history", ):
        np.testing.assert_allclose(fits["two"][stage]["train_loss"], fits["one"][stage]["train_loss"],
                                   rtol=1e-3, atol=1e-4)
    tuned = [f["decision"]["stage2"]["history"] for f in (fits["one"], fits["two"])]
    np.testing.assert_allclose(tuned[1]["train_loss"], tuned[0]["train_loss"], rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(tuned[1]["val_loss"], tuned[0]["val_loss"], rtol=2e-3, atol=1e-4)
    heads = _head(tmp_path / "one"), _head(tmp_path / "two")
    assert heads[0].keys() == heads[1].keys()
    for key in heads[0]:
        np.testing.assert_allclose(heads[1][key], heads[0][key], rtol=2e-3, atol=2e-3, err_msg=key)
    acc = [m["fit"]["metrics"]["val"]["accuracy"] for m in (meta["one"], meta["two"])]
    assert abs(acc[0] - acc[1]) <= 0.02


FAIL_ON_RANK_1 = """
import os, sys
if os.environ["RANK"] == "1":  # one rank fails after the group is joined, while rank 0 waits for it
    import headstart.train.fit_head as fit_head
    from headstart.errors import ConfigError
    def fail(*args, **kwargs):
        raise ConfigError("rank 1 cannot go on")
    fit_head.fit_best_head = fail
from headstart.cli import main
sys.argv[0] = "headstart"
main()
"""


def test_an_error_on_one_rank_ends_both_quickly_with_one_message(photos, tiny_weights, env, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    proc, took = _torchrun("train", photos, "--out", tmp_path / "m", "--weights", tiny_weights, *RUN, env=env,
                           cwd=tmp_path, module=(str(script),))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == ["error: rank 1 cannot go on"], out
    assert took < 90, f"{took:.0f} s: a rank waited for the failed one"
    assert not (tmp_path / "m" / "headstart.json").exists()


def test_a_bad_flag_fails_on_every_rank_before_they_join_with_one_message(photos, env, tmp_path):
    proc, _ = _torchrun("train", photos, "--epochs", "0", env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "epochs" in errors[0], out


# --- the pieces, in one process --------------------------------------------------------------------------------


@pytest.fixture
def as_rank(monkeypatch):
    def place(rank: int, world: int = 2) -> None:
        monkeypatch.setattr(distributed, "_joined", distributed.Launch(world, rank, rank, world, "gloo"))
    return place


@pytest.mark.parametrize("weighted", [False, True])
def test_the_ranks_shares_of_a_batch_make_up_its_mean_loss_exactly(as_rank, weighted):
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, 40))
    logits = torch.from_numpy(rng.normal(size=(40, 3)))
    weight = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64) if weighted else None
    idx = np.sort(rng.choice(40, 11, replace=False))
    whole = F.cross_entropy(logits[idx], labels[idx], weight=weight, label_smoothing=0.1).item()
    parts, rows = 0.0, []
    for rank in range(3):
        as_rank(rank, 3)
        mine, share = distributed.split_batch(idx, labels, weight)
        parts += F.cross_entropy(logits[mine], labels[mine], weight=weight, label_smoothing=0.1).item() * share
        rows += list(mine)
    assert sorted(rows) == list(idx)
    assert parts == pytest.approx(whole, rel=1e-12)


def test_a_rank_without_rows_of_a_batch_adds_nothing(as_rank):
    as_rank(1, 2)
    mine, share = distributed.split_batch(np.array([7]), torch.tensor([0] * 8))
    assert list(mine) == [7] and share == 0.0


def test_the_sampler_gives_each_rank_the_rows_of_every_global_batch(as_rank):
    order = np.random.default_rng(1).permutation(24)
    batch = 8
    mine = []
    for rank in range(2):
        as_rank(rank)
        assert distributed.per_rank(batch) == 4
        mine.append(distributed.sampled(order))
    for start in range(0, 24, batch):  # the union of the ranks' k-th batches is the one-process k-th batch
        got = np.concatenate([m[start // 2:start // 2 + 4] for m in mine])
        assert sorted(got) == sorted(order[start:start + batch])


def test_one_process_is_untouched(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.start("cpu") == distributed.Launch()
    idx = np.arange(5)
    assert distributed.split_batch(idx, None) == (idx, 1.0)
    assert distributed.sampled(idx) is idx and distributed.same(1.5) == [1.5]


def test_torchrun_variables_that_make_no_sense_are_one_line(monkeypatch):
    from headstart.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2"):
        distributed.from_env()


def test_older_models_load_as_one_process_runs():
    from headstart.records import DistributedRun

    assert DistributedRun.from_dict({}) == DistributedRun(1, "")
    assert DistributedRun.from_dict({"world_size": 2, "backend": "gloo"}).to_dict() == {"world_size": 2,
                                                                                          "backend": "gloo"}


def test_cuda_without_a_gpu_is_one_line_before_any_work(monkeypatch):
    from headstart.errors import ConfigError
    from headstart.runtime.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for start in (pick_device, distributed.start):
        with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU") as err:
            start("cuda")
        assert "\n" not in str(err.value)
    assert pick_device("cpu") == "cpu"


# --- the boundary store's parts -----------------------------------------------------------------------------------


def test_ranks_parts_of_the_boundary_store_join_into_the_one_process_store(tiny_weights, ft_cache, tmp_path):
    from headstart.cache.boundary import BoundaryStore, _part, bottom_engine
    from headstart.errors import ConfigError
    from helpers_finetune import PRE, _frozen, _images

    frozen = _frozen(tiny_weights)
    engine = bottom_engine(frozen.build_torch(), 3, frozen.weights_id, PRE)
    paths = _images(make_image_folder(tmp_path / "photos", per_class=3, size=(72, 56)))
    args = (2, "light", 0, PRE, engine, None, 4)  # views, augment, seed, preprocessing, engine, progress, batch
    reference = BoundaryStore(dict(test="parts"), tmp_path / "one")
    reference.fill("train", paths, *args)

    store = BoundaryStore(dict(test="parts"), tmp_path / "two")
    n = len(paths)
    blocks = [(0, n // 2), (n // 2, n)]
    for lo, hi in reversed(blocks):  # each rank its block, with the views a one-process fill draws for those rows
        store._fill(_part("train", lo, hi), paths[lo:hi], lo, *args)
    with pytest.raises(ConfigError, match="HEADSTART_CACHE"):  # a part filled in another machine's cache
        store._join("train", n, 2, [(0, 2), (2, n)])
    store._join("train", n, 2, blocks)
    assert sorted(p.name for p in store.dir.iterdir()) == sorted(p.name for p in reference.dir.iterdir())
    for got, want in zip(store.arrays("train"), reference.arrays("train")):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert store._is_complete("train", n, 2)
