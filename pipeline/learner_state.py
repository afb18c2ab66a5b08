"""The learner's share of a checkpoint: master weights, optimiser, LR schedule and RNG, per rank.

Pure torch (no Ray), so a unit test can save a Learner, build a fresh one and compare the
next steps. Everything is safetensors or JSON: loading never unpickles (torch.load and
torch.distributed.checkpoint's `.metadata` both do).

    learner/model_rank<r>.safetensors    this rank's parameters (local shards under FSDP2)
    learner/optim_rank<r>.safetensors    optimiser tensors, keyed "<param index>.<name>"
    learner/optim_rank<r>.json           optimiser scalars and param_groups, scheduler, RNG
Replicated models (one worker, DDP) write rank 0's files only; every rank reads them. FSDP2
(parameters are DTensors) writes one set per rank: a resume needs the same world size.
The fp32 master weights are saved apart from the HF policy (which is in model.dtype), so a
bf16 run resumes without losing precision.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

try:
    from torch.distributed.tensor import DTensor
except ImportError:   # pragma: no cover - torch builds without distributed
    DTensor = ()


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.detach().to("cpu").contiguous()


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` (a saved local tensor) placed as `ref` is: same device, and re-sharded as a DTensor."""
    if isinstance(ref, DTensor):
        return DTensor.from_local(t.to(ref.to_local().device), ref.device_mesh, ref.placements,
                                  shape=ref.shape, stride=ref.stride())
    return t.to(ref.device)


def _rank_file(directory: Path, stem: str, rank: int, sharded: bool, suffix: str) -> Path:
    return directory / f"{stem}_rank{rank if sharded else 0}.{suffix}"


def save_learner(directory: Path, model, optimizer, scheduler, *, rank: int) -> list[Path]:
    """Write this rank's learner state into `directory`; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    sharded = is_sharded(model)
    if rank != 0 and not sharded:
        return []
    weights = {name: _local(p) for name, p in model.named_parameters()}
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = _local(v)
            else:
                scalars[f"{idx}.{k}"] = v
    meta = {"param_groups": sd["param_groups"], "scalars": scalars,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": {"python": _py_rng(), "numpy": _np_rng()}}
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    files = [_rank_file(directory, "model", rank, sharded, "safetensors"),
             _rank_file(directory, "optim", rank, sharded, "safetensors"),
             _rank_file(directory, "optim", rank, sharded, "json")]
    save_file(weights, str(files[0]))
    save_file({**tensors, **rng}, str(files[1]))
    files[2].write_text(json.dumps(meta))
    return files


def load_learner(directory: Path, model, optimizer, scheduler, *, rank: int) -> None:
    """Restore what save_learner wrote into an already built (and wrapped) model and optimiser."""
    sharded = is_sharded(model)
    path = _rank_file(directory, "model", rank, sharded, "safetensors")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no learner state for rank {rank} (was the run saved with "
                                f"another train.num_workers?)")
    weights = load_file(str(path))
    params = dict(model.named_parameters())
    if weights.keys() != params.keys():
        raise ValueError(f"{path}: saved parameters do not match the model "
                         f"({sorted(weights.keys() ^ params.keys())[:3]} ...)")
    with torch.no_grad():
        for name, p in params.items():
            (p.to_local() if isinstance(p, DTensor) else p).copy_(weights[name])
    tensors = load_file(str(_rank_file(directory, "optim", rank, sharded, "safetensors")))
    meta = json.loads(_rank_file(directory, "optim", rank, sharded, "json").read_text())
    order = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("rng."):
            continue
        idx, name = key.split(".", 1)
        ref = order[int(idx)]
        # AdamW's `step` is a scalar CPU tensor, never sharded; the moments are shaped like the param
        state.setdefault(int(idx), {})[name] = t if t.dim() == 0 else _like(t, ref)
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    random.setstate(_py_rng_from(meta["rng"]["python"]))
    np.random.set_state(_np_rng_from(meta["rng"]["numpy"]))


def _py_rng():
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _py_rng_from(s):
    return s[0], tuple(s[1]), s[2]


def _np_rng():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, gauss]


def _np_rng_from(s):
    return s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4]


def save_policy(directory: Path, model, state: dict[str, torch.Tensor], dtype: str, tokenizer) -> None:
    """The policy as a Hugging Face model directory in `dtype` (config.json, safetensors shards of
    at most 5 GB, tokenizer files, generation_config.json): what from_pretrained and vLLM load."""
    torch_dtype = getattr(torch, dtype)
    weights = {k: v.to(torch_dtype) for k, v in state.items()}
    model.config.dtype = torch_dtype               # config.json says what the files hold
    model.save_pretrained(str(directory), state_dict=weights, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(str(directory))
