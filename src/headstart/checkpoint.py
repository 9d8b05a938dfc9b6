"""Training checkpoints without pickle: tensors (model, optimizer moments, torch RNG) in safetensors, everything
else (epoch, scheduler counters, numpy RNG, history, config) in JSON.

Both files are written to temporary names and renamed; the JSON names the digest of the tensor file it belongs to,
so a kill between the two renames is detected and the previous checkpoint pair is never mixed with a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from headstart.errors import UserError
from headstart.paths import atomic_write_bytes, temp_path_beside

TENSORS, META = "state.safetensors", "state.json"


class CheckpointError(UserError):
    pass


def save(directory: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(directory / TENSORS)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    digest = _digest(tmp)
    os.replace(tmp, directory / TENSORS)
    atomic_write_bytes(directory / META, json.dumps({**meta, "tensors_sha256": digest}).encode())


def load(directory: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The last complete checkpoint in `directory`, or None when there is none."""
    meta_path, tensors_path = directory / META, directory / TENSORS
    if not meta_path.exists() or not tensors_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("tensors_sha256") != _digest(tensors_path):
        raise CheckpointError(f"{directory}: checkpoint files do not belong together (killed while saving?); "
                              "rerun without --resume to start over")
    return load_file(str(tensors_path)), meta


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


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
