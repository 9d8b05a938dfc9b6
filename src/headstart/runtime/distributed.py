"""Runs over several processes with PyTorch's own distributed runtime: `torchrun` starts them, nothing home-made
coordinates them.

torchrun tells each process its place (WORLD_SIZE, RANK, LOCAL_RANK); `start` joins them in one process group,
gloo on the CPU and NCCL for CUDA tensors (with gloo beside it for the CPU ones). What a run does with it:
- feature extraction and the boundary-store fill: each rank computes its share of the same content-keyed cache
  (`share`), then a `barrier`, then every rank reads the whole cache; no rank recomputes another's part;
- the head: every rank holds every feature and the same head; each computes the gradient of its rows of every
  batch (`split_batch`) and `sum_arrays` adds them up, so each rank takes the step the one-process run takes;
- stage 2: DistributedDataParallel over the trained top, each rank reading its share of each batch through a
  DistributedSampler over the epoch's order (`ddp`, `sampled`);
- validation is computed identically on every rank and rank 0's figures decide for all (`same`), so that no rank
  ever stops while another goes on into a collective and waits for it;
- only rank 0 prints, writes the model and its checkpoints (`current().is_main`).

An error on one rank: the first rank to report it says so (`claim_report`), the others exit quietly; a peer's
pending collective fails as soon as the failed process's sockets close, and torchrun stops the rest. A rank that
waits longer than HEADSTART_DIST_TIMEOUT_S (default 1800 s) for the others gives up.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np

from headstart.errors import ConfigError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "HEADSTART_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; a shard's extraction may keep its peers waiting


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: how many processes there are, which one it is, and (once joined) the
    backend they talk over. One process: world_size 1, and every collective below is a no-op."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def record(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend or None}


_joined: Launch | None = None


def from_env() -> Launch:
    """What torchrun's variables say; a value that is not a number (or out of range) is one clear line."""
    def number(name: str, default: int) -> int:
        text = os.environ.get(name, "").strip()
        try:
            return int(text) if text else default
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not a whole number; launch with torchrun, which sets it") from None

    world = number("WORLD_SIZE", 1)
    rank = number("RANK", 0)
    local_rank = number("LOCAL_RANK", rank)
    local_world = number("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(1, local_world):
        raise ConfigError(f"RANK={rank}, LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world}; launch with "
                          "torchrun, which sets them")
    return Launch(world, rank, local_rank, local_world)


def current() -> Launch:
    """The run as joined by `start`, or, before it, as the environment describes it (unparsable: one process)."""
    if _joined is not None:
        return _joined
    try:
        return from_env()
    except ConfigError:
        return Launch()


def joined() -> Launch:
    """The run as `start` joined it, in the thread that joined it. One process until then (collectives need the
    group, not just the variables), and in every other thread: work done in threads (folds side by side, say)
    runs whole on every rank, identically, since collectives issued from several threads would pair up in a
    different order on each rank."""
    if _joined is None or threading.current_thread() is not threading.main_thread():
        return Launch()
    return _joined


class _Inline:
    """An executor that runs each job as it is submitted, in the caller's thread."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn, *args, **kwargs) -> Future:
        done: Future = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed over as a thread pool would, through result()
            done.set_exception(exc)
        return done


def executor(workers: int):
    """A thread pool of `workers`; under torchrun the jobs run one after another in this thread instead, so that
    their collectives come in one order on every rank (and stay collectives: see `joined`)."""
    return _Inline() if joined().active else ThreadPoolExecutor(max_workers=workers)


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def start(device: str) -> Launch:
    """Join the process group torchrun set up (once; later calls return the same). `device` is the run's
    setting: "cuda" (or "auto" finding a GPU) puts each rank on GPU LOCAL_RANK and talks NCCL."""
    global _joined
    from headstart.runtime.device import pick_device

    launch = from_env()
    if device.startswith("cuda"):
        pick_device(device)  # no GPU: one line now, before the scan and the extraction
    if _joined is not None or not launch.active:
        return _joined or launch
    seconds = timeout_s()
    import torch
    import torch.distributed as dist

    on_gpu = pick_device(device).startswith("cuda")
    if on_gpu:
        if torch.cuda.device_count() < launch.local_world_size:
            raise ConfigError(f"{launch.local_world_size} processes on this node but {torch.cuda.device_count()} "
                              "GPU(s); use torchrun --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(launch.local_rank)  # "cuda" is this rank's GPU from here on
    backend = "cpu:gloo,cuda:nccl" if on_gpu else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
        atexit.register(_leave)
    _joined = replace(launch, backend="nccl" if on_gpu else "gloo")
    log.info("rank %d of %d joined (%s)", launch.rank, launch.world_size, _joined.backend)
    return _joined


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# --- collectives: each is a no-op in one process, and every rank must call it at the same point ---------------

def barrier() -> None:
    if joined().active:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (an export every rank needs, written once to the shared cache), the others
    after it, finding its result."""
    if not joined().is_main:
        barrier()
    yield
    if joined().is_main:
        barrier()


def share(n: int) -> np.ndarray:
    """The items of `range(n)` this rank computes: every world_size-th, from its rank (all of them in one process)."""
    run = joined()
    return np.arange(run.rank, n, run.world_size)


def block(n: int) -> tuple[int, int]:
    """This rank's contiguous block [lo, hi) of `range(n)` (for stores whose parts are row ranges)."""
    run = joined()
    return n * run.rank // run.world_size, n * (run.rank + 1) // run.world_size


def _reduce(values: Iterable[float], op: str) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over the ranks."""
    return _reduce(values, "SUM") if joined().active else list(values)


def all_agree(flag: bool) -> bool:
    """True when `flag` is true on every rank."""
    return bool(_reduce([float(flag)], "MIN")[0]) if joined().active else flag


def same(*values: float) -> list[float]:
    """Rank 0's values on every rank: what decides for all (early stopping, divergence) must be one figure."""
    if not joined().active:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    dist.broadcast(t, 0)
    return t.tolist()


def split_batch(idx: np.ndarray, labels, weight=None) -> tuple[np.ndarray, float]:
    """This rank's rows of a batch of row indices `idx`, and the share of the batch's loss they carry: a rank's
    mean loss times its share, summed over the ranks, is the batch's mean loss exactly (class weights included:
    a weighted mean divides by the weights of the batch's labels). A rank left without rows computes one row
    at share 0, so that it still has gradients to add."""
    run = joined()
    if not run.active:
        return idx, 1.0
    mine = idx[run.rank::run.world_size]
    if len(mine) == 0:
        return idx[:1], 0.0
    if weight is None:
        return mine, len(mine) / len(idx)
    return mine, float(weight[labels[mine]].sum() / weight[labels[idx]].sum())


def sum_arrays(arrays: list[np.ndarray]) -> None:
    """Add up numpy arrays (the head's gradients) over the ranks, in place, in one flat all-reduce."""
    if not joined().active:
        return
    import torch
    import torch.distributed as dist

    flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]))
    dist.all_reduce(flat)
    offset = 0
    for a in arrays:
        a.reshape(-1)[:] = flat[offset:offset + a.size].numpy()
        offset += a.size


def broadcast_state(module) -> None:
    """Rank 0's parameters and buffers on every rank (BatchNorm statistics trained per rank included)."""
    if not joined().active:
        return
    import torch.distributed as dist

    for tensor in module.state_dict().values():
        dist.broadcast(tensor.data, 0)


def sampled(order: np.ndarray) -> np.ndarray:
    """This rank's part of an epoch's `order`, as a DistributedSampler (no shuffling of its own: the order is the
    loop's, drawn from its checkpointed generator) gives it; padded so every rank takes as many steps."""
    run = joined()
    if not run.active:
        return order
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(order)), num_replicas=run.world_size, rank=run.rank, shuffle=False)
    return order[list(sampler)]


def per_rank(batch_size: int) -> int:
    """Each rank's part of a global batch: the global batch (and the steps per epoch) stay the one-process run's."""
    run = joined()
    return max(1, -(-batch_size // run.world_size))


def ddp(module, broadcast_buffers: bool = False):
    """`module` under DistributedDataParallel (its trainable parameters' gradients averaged over the ranks in
    backward), or `module` itself in one process."""
    run = joined()
    if not run.active:
        return module
    import torch
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    # Newer torch names the switch forward_sync_buffers (and warns about the old name); both sync at start,
    # where every rank's buffers are the same anyway.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    sync = {"forward_sync_buffers" if newer else "broadcast_buffers": broadcast_buffers}
    return DistributedDataParallel(module, device_ids=ids, **sync)


# --- errors ---------------------------------------------------------------------------------------------------

def claim_report() -> bool:
    """Whether this rank should print the error that stops it: the first rank to ask does, the others (stopping
    for the same reason, or because the first one left) stay quiet. Asked through torchrun's store; when it
    cannot be reached, every rank reports (better twice than never)."""
    run = current()
    if not run.active:
        return True
    try:
        from torch.distributed import TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=5), wait_for_workers=False)
        key = f"headstart/error/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/" \
              f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return store.add(key, 1) == 1
    except Exception:  # no store to ask (launched by hand, or the store is gone): say it anyway
        return True


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another rank stopped (its sockets closed, or it timed out)."""
    if not current().active or "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and any(w in str(exc) for w in ("Connection closed by peer", "Gloo",
                                                                          "NCCL", "Connection reset by peer")))


def dropout_rng(rng: np.random.Generator, seed: int) -> np.random.Generator:
    """The generator of a rank's dropout masks: `rng` in one process; under torchrun one of the rank's own, as
    masks of rows of different sizes would otherwise move the ranks' shared `rng` (their batch order) apart."""
    run = joined()
    return rng if not run.active else np.random.default_rng([seed, run.rank])
