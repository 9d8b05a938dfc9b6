"""Where computation runs: the device a run asks for, and how many CPU threads it may use."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cpu_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if "torch" not in sys.modules:
        # Importing torch only to learn there is no GPU costs seconds; CUDA setups set this variable anyway.
        if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
            return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
