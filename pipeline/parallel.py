"""Data parallelism for the learner: build and wrap the HF policy for DDP or FSDP2, read its weights back.

Pure torch (no Ray): actors/learner.py calls `build_policy` once per Ray Train worker after
the process group is up, `build_reference` for the KL term, and `full_state_dict` on every
rank before rank 0 publishes. Both strategies average gradients over W workers, which
`pipeline.policy` undoes by scaling each worker's loss by W. Test: `pytest tests/unit/test_parallel.py -q`.

FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023 / torchtitan) shards each
decoder layer and then the root; the root group holds the embeddings, the final norm
and lm_head, so tied embeddings (one Parameter under two names) stay in one group.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoConfig, AutoModelForCausalLM

STRATEGIES = ("ddp", "fsdp")


def resolve_strategy(strategy: str, use_gpu: bool) -> str:
    """auto -> fsdp on GPUs, ddp (over gloo) on CPU; ddp / fsdp pass through."""
    if strategy == "auto":
        return "fsdp" if use_gpu else "ddp"
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy must be auto, ddp or fsdp, got {strategy!r}")
    return strategy


def build_policy(model_dir: str, *, rank: int, world_size: int, strategy: str, device: torch.device,
                 dtype: str = "float32", gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The policy in fp32 master weights, wrapped; under FSDP2 with W > 1 only rank 0 reads the weights.

    W ranks each loading the full fp32 model would hold W copies in host memory at once (28 GB
    each for a 7B model): the others build it on the meta device, shard it, and receive their
    shards from rank 0.
    """
    wrap = dict(strategy=strategy, device=device, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                world_size=world_size)
    if strategy != "fsdp" or world_size == 1:
        return wrap_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), **wrap)
    if rank == 0:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        full = model.state_dict()   # fully_shard copies each shard, so these full tensors live on until sent
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
        model.eval()   # as from_pretrained returns it, so every rank checkpoints (train mode) alike
        full = {}
    model = wrap_model(model, **wrap)
    _load_from_rank0(model, full, device, meta=rank != 0)
    return model


def _load_from_rank0(model: torch.nn.Module, full: dict, device: torch.device, meta: bool) -> None:
    """Fill every rank's shards and buffers from rank 0, whose model holds the loaded weights."""
    if meta:
        # the tied lm_head / embed_tokens stay one Parameter: DTensor params are swapped in place,
        # not re-created (torch/nn/modules/module.py, Module._apply, is_traceable_wrapper_subclass)
        model.to_empty(device=device)
    # non-persistent buffers (the rotary inv_freq) are in no state dict: rank 0's, made from the config
    for buf in model.buffers():
        dist.broadcast(buf, src=0)
    # rank 0 sends one tensor at a time and each rank keeps its slice; the others pass {}
    # (torch/distributed/_state_dict_utils.py, _broadcast_state_dict)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def wrap_model(model: torch.nn.Module, *, strategy: str, device: torch.device, dtype: str = "float32",
               gradient_checkpointing: bool = False, world_size: int = 1) -> torch.nn.Module:
    """Checkpointing first, then FSDP2 over all ranks (one included) or DDP (as ray.train.torch.prepare_model)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        # HF checkpoints only in training mode, and from_pretrained returns the model in eval mode
        model.train()
    if device.type == "cuda":  # NCCL collectives and init_device_mesh use the current device
        torch.cuda.set_device(device)
    grouped = dist.is_available() and dist.is_initialized()
    if strategy == "fsdp" and grouped and (world_size > 1 or dtype == "bfloat16"):
        # with one bf16 worker too: FSDP2's MixedPrecisionPolicy is the bf16 compute over fp32
        # master weights, and Ray Train makes a process group even for one worker
        # (ray/train/torch/config.py, _TorchBackend.on_start). One fp32 worker stays a plain
        # model: nothing to gain, and a group left by someone else (an in-process vLLM engine
        # makes one) must not turn it into DTensors.
        return _fully_shard(model, init_device_mesh(device.type, (dist.get_world_size(),)), dtype)
    if dtype == "bfloat16" and device.type == "cuda":
        # rather than a second bf16 path (autocast, with other numerics to test): the only callers
        # without a group are scripts and tests, and they can make a one-rank group
        raise ValueError("model.dtype=bfloat16 computes in bf16 through FSDP2: use train.strategy=fsdp (or auto) "
                         "under a process group, of one rank if need be (Ray Train always makes one)")
    model = model.to(device)
    if strategy == "ddp" and grouped and world_size > 1:
        # device_ids only for a single accelerator per process; CPU (gloo) takes None
        ids = [device] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=device if ids else None)
    return model


def _fully_shard(model: torch.nn.Module, mesh: DeviceMesh, dtype: str) -> torch.nn.Module:
    """FSDP2: one group per decoder layer, then the root (embeddings, norm, lm_head)."""
    # params gathered in bf16 for compute; gradients reduced and kept (sharded) in fp32
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if dtype == "bfloat16" else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # moves the rest (root params, buffers) to the device
    return model


def build_reference(policy: torch.nn.Module, *, dtype: str = "float32") -> torch.nn.Module:
    """A frozen copy of the policy as it is now (the KL reference), sharded as the policy is.

    copy.deepcopy refuses an FSDP2 module ("FSDP does not support deepcopy",
    torch/distributed/fsdp/_fully_shard/_fully_shard.py), so the copy is built empty from the
    config, sharded over the policy's mesh, and each rank copies its own shards: no gather.
    Its forward is a collective under FSDP2: every rank must run it for every micro-batch.
    """
    src = unwrap(policy)
    if isinstance(src, FSDPModule):
        src.reshard()   # the root keeps its params unsharded after a forward; the copy reads the shards
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    ref.requires_grad_(False).eval()   # before sharding: FSDP2 gives each shard its param's requires_grad
    first = next(src.parameters())
    if isinstance(first, DTensor):
        _fully_shard(ref, first.device_mesh, dtype)
        first = first.to_local()
    ref.to_empty(device=first.device)
    # to_empty re-creates plain (unsharded) params, which unties lm_head from embed_tokens
    # (torch/nn/modules/module.py, Module._apply); DTensor params are swapped in place and stay tied
    ref.tie_weights()
    params, buffers = dict(src.named_parameters()), dict(src.named_buffers())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            _local(p).copy_(_local(params[name]))   # same mesh and shapes: the same slice on this rank
        for name, b in ref.named_buffers():
            b.copy_(buffers[name])
    return ref


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


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
