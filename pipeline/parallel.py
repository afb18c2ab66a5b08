"""Data parallelism for the learner: wrap the HF model for DDP or FSDP2, read its weights back.

Pure torch (no Ray): actors/learner.py calls `wrap_model` once per Ray Train worker after
the process group is up, and `full_state_dict` on every rank before rank 0 publishes.
Both strategies average gradients over W workers, which `pipeline.policy` undoes by
scaling each worker's loss by W. Test: `pytest tests/unit/test_parallel.py -q`.

FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023 / torchtitan) shards each
decoder layer and then the root; the root group holds the embeddings, the final norm
and lm_head, so tied embeddings (one Parameter under two names) stay in one group.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("ddp", "fsdp")


def resolve_strategy(strategy: str, use_gpu: bool) -> str:
    """auto -> fsdp on GPUs, ddp (over gloo) on CPU; ddp / fsdp pass through."""
    if strategy == "auto":
        return "fsdp" if use_gpu else "ddp"
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy must be auto, ddp or fsdp, got {strategy!r}")
    return strategy


def wrap_model(model: torch.nn.Module, *, strategy: str, device: torch.device, dtype: str = "float32",
               gradient_checkpointing: bool = False, world_size: int = 1) -> torch.nn.Module:
    """Checkpointing first, then DDP (as ray.train.torch.prepare_model) or FSDP2 over all ranks."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        # HF checkpoints only in training mode, and from_pretrained returns the model in eval mode
        model.train()
    if device.type == "cuda":  # NCCL collectives and init_device_mesh use the current device
        torch.cuda.set_device(device)
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    if strategy == "fsdp" and distributed:
        return _fully_shard(model, device, dtype)
    model = model.to(device)
    if strategy == "ddp" and distributed:
        # device_ids only for a single accelerator per process; CPU (gloo) takes None
        ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=device if ids else None)
    return model


def _fully_shard(model: torch.nn.Module, device: torch.device, dtype: str) -> torch.nn.Module:
    """FSDP2: one group per decoder layer, then the root (embeddings, norm, lm_head)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # params gathered in bf16 for compute; gradients reduced and kept (sharded) in fp32
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if dtype == "bfloat16" else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # moves the rest (root params, buffers) to the device
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF module under a DDP wrapper; FSDP2 shards in place, so it is the model itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Full, unsharded CPU weights under HF names on rank 0; None elsewhere. Collective under FSDP2."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if isinstance(model, FSDPModule):
        # every rank must enter: each layer is all-gathered; cpu_offload keeps the result on rank 0 only
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if rank0 else None
    if not rank0:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def no_sync(model: torch.nn.Module, last: bool):
    """Context for one micro-batch's backward: skip DDP's all-reduce until the last one.

    FSDP2 reduce-scatters every micro-batch on purpose: `set_requires_gradient_sync(False)`
    would keep *unsharded* gradients, upcast to reduce_dtype (fp32), on every rank until the
    last micro-batch — 28 GB extra per GPU for a 7B model — to save one reduce-scatter per
    micro-batch, which is small next to a 16k-token forward/backward.
    """
    if not last and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return nullcontext()
