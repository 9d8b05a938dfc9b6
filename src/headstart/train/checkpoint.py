"""Training checkpoints without pickle: tensors (model, optimizer moments, torch RNG) in safetensors, everything
else (epoch, scheduler counters, numpy RNG, history, config) in JSON.

The tensor file is named by its digest and written first; the JSON, written atomically last, names it. A kill at
any point leaves the previous JSON pointing at the previous tensor file, which is only deleted afterwards, so
there is always one complete checkpoint to resume from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from headstart.errors import CheckpointError
from headstart.backbones.weights import save_state_dict
from headstart.paths import atomic_write_bytes, file_sha256

META = "state.json"


def save(directory: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
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
    meta = json.loads(meta_path.read_text())
    tensors_path = directory / Path(str(meta.get("tensors", ""))).name  # never a path outside the folder
    if not tensors_path.is_file() or meta.get("tensors_sha256") != file_sha256(tensors_path):
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
    # safetensors gives back contiguous tensors, while the moments of a channels_last weight were channels_last:
    # the fused AdamW step pairs elements by memory order, so a 3x3 convolution over several channels (the stem's)
    # would be updated with another element's moments. Give each moment its parameter's layout again.
    for group in opt.param_groups:
        for p in group["params"]:
            for name, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][name] = torch.empty_like(p).copy_(value)
