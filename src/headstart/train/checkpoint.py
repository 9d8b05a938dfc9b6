"""Training checkpoints without pickle: tensors (model, optimizer moments, torch RNG) in safetensors, everything
else (epoch, scheduler counters, numpy RNG, history, config) in JSON.

The tensor file is named by its digest and written first; the JSON, written atomically last, names it. A kill at
any point leaves the previous JSON pointing at the previous tensor file, which is only deleted afterwards, so
there is always one complete checkpoint to resume from. A checkpoint damaged on disk (a JSON that does not parse
or lacks its fields, a tensor file missing, of another digest or unparsable) is refused with one line naming the
file, never resumed from: a resumed run must continue the interrupted one exactly, or not at all. Under torchrun,
rank 0 alone writes checkpoints and every rank reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from headstart.backbones.weights import save_state_dict
from headstart.errors import CheckpointError
from headstart.paths import atomic_write_bytes, disk_space, file_sha256
from headstart.runtime import distributed

META = "state.json"


def save(directory: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a checkpoint; under torchrun rank 0 alone writes (every rank holds the same state, and all read it
    back on --resume)."""
    if not distributed.joined().is_main:
        return
    with disk_space(directory / META):
        directory.mkdir(parents=True, exist_ok=True)
    path, digest = save_state_dict(tensors, directory / "state.safetensors", content_named=True)
    name = path.name
    atomic_write_bytes(directory / META, json.dumps({**meta, "tensors": name, "tensors_sha256": digest}).encode())
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load(directory: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The last complete checkpoint in `directory`, or None when there is none."""
    meta_path = directory / META
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise _damaged(meta_path, f"unreadable ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), str):
        raise _damaged(meta_path, "not a checkpoint record")
    tensors_path = directory / Path(meta["tensors"]).name  # never a path outside the folder
    if not tensors_path.is_file() or meta.get("tensors_sha256") != file_sha256(tensors_path):
        raise CheckpointError(f"{directory}: checkpoint files do not belong together (killed while saving?); "
                              "rerun without --resume to start over")
    try:
        return load_file(str(tensors_path)), meta
    except Exception as exc:  # safetensors' own error types; the digest matched, so the writer wrote this
        raise _damaged(tensors_path, f"unparsable ({' '.join(str(exc).split())})") from None


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: damaged checkpoint, {why}; rerun without --resume to start over")


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"opt.{pid}.{name}": (v if torch.is_tensor(v) else torch.tensor(v))
               for pid, st in sd["state"].items() for name, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    # safetensors gives back contiguous tensors, while the moments of a channels_last weight were channels_last:
    # the fused AdamW step pairs elements by memory order, so a 3x3 convolution over several channels (the stem's)
    # would be updated with another element's moments. Give each moment its parameter's layout again.
    for group in opt.param_groups:
        for p in group["params"]:
            for name, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][name] = torch.empty_like(p).copy_(value)
