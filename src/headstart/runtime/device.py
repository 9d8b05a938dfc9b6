"""Where computation runs: the device a run asks for, and how many CPU threads it may use."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def cpu_threads() -> int:
    """The cores this process may use: its share when torchrun runs several processes on this node, so that
    two ranks on two cores run one thread each rather than four threads fighting over two cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        per_node = 1
    return max(1, cores // per_node)


def pick_device(requested: str = "auto") -> str:
    """"auto" -> "cuda" where torch sees a GPU, else "cpu"; "cuda" where none is visible is a ConfigError (one
    line, before any work), not the driver's traceback from the first tensor moved there."""
    if requested.startswith("cuda"):
        _require_cuda(requested)
    if requested != "auto":
        return requested
    if "torch" not in sys.modules:
        # Importing torch only to learn there is no GPU costs seconds; CUDA setups set this variable anyway.
        if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
            return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _require_cuda(requested: str) -> None:
    import torch

    from headstart.errors import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: no CUDA GPU is visible here (torch {torch.__version__} found none "
                          "with a working driver); use --device cpu, or auto to take a GPU when there is one")
    index = requested.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s), numbered "
                          "from 0; use --device cuda")


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS with one thread inside the block (threadpoolctl; the count before restored after it), for the
    head's fits, which run one per core side by side. The head's matrices are small, so a second thread only adds
    synchronisation; and while another process holds a core, a BLAS thread's waiting makes every step tens of
    times slower (torch's OpenMP, when the head trained in torch: 60 epochs on 300 x 1500 features, 2 cores, one
    busy: 30 s with 2 threads, 0.5 s with 1). A block, not a decorator: a decorated function pinned only its own
    body, and the pin was lost once when a helper was inserted between the decorator and the fits."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def int8_is_fast(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ONNX Runtime's int8 kernels clearly beat its float32 ones on this CPU: x86's VNNI (AVX-512 or
    AVX), whose multiply-adds sum four 8-bit products into 32 bits in one instruction. AVX2 alone runs int8 too,
    but a cold flowers train was only 1.03x faster there (see `frozen.resolve_engine`); ARM's dot product is
    unmeasured. Unknown CPUs (no /proc/cpuinfo) get False, and with it float32."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_vnni", "avx_vnni"})
