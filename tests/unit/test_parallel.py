"""DDP and FSDP2 on CPU (gloo, 2 processes): one GRPO step on two shards equals one step on the whole.

Each spawned rank trains its shard (groups[rank::2], as the Learner does) and also runs the
single-process reference on the whole batch, then compares inside the child: an assertion
there fails the test with the child's traceback. Also: rank-0 loading onto meta-device
ranks, the KL reference under FSDP2, and FSDP2's bf16 compute with one rank.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from pipeline import policy
from pipeline.grpo import LossConfig
from pipeline.parallel import (build_policy, build_reference, full_state_dict, no_sync, resolve_strategy, unwrap,
                               wrap_model)
from pipeline.policy import collate, grpo_update, micro_batches, token_logprobs
from tests.unit.test_policy import random_groups, tiny_qwen

WORLD = 2


def test_resolve_strategy():
    assert resolve_strategy("auto", use_gpu=True) == "fsdp"
    assert resolve_strategy("auto", use_gpu=False) == "ddp"
    assert resolve_strategy("fsdp", use_gpu=False) == "fsdp"
    with pytest.raises(ValueError, match="strategy"):
        resolve_strategy("zero3", use_gpu=True)


def test_parallel_and_policy_import_no_ray():
    code = "import sys, pipeline.parallel, pipeline.policy; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_single_process_wrap_is_the_plain_model_and_publishes_a_copy():
    model = tiny_qwen()
    wrapped = wrap_model(model, strategy="fsdp", device=torch.device("cpu"), gradient_checkpointing=True)
    assert wrapped is model and model.training and not model.config.use_cache
    sd = full_state_dict(wrapped)
    assert sd.keys() == model.state_dict().keys()
    sd["lm_head.weight"].add_(1.0)                               # a copy: publishing never aliases training
    assert not torch.equal(sd["lm_head.weight"], model.lm_head.weight)
    assert isinstance(no_sync(model, last=False), nullcontext)          # nothing to hold back alone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce(num_micro: int, norm: float) -> tuple[int, float]:
    """As Learner._all_reduce: max micro-batches, summed loss denominator."""
    mx, total = torch.tensor([float(num_micro)]), torch.tensor([norm])
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    dist.all_reduce(total)
    return int(mx), float(total)


def _step(rank: int, strategy: str, groups, kw: dict, dtype: str = "float32"):
    """Wrap a fresh tiny model, train this rank's shard for one batch -> (model, metrics)."""
    model = wrap_model(tiny_qwen(), strategy=strategy, device=torch.device("cpu"), world_size=WORLD, dtype=dtype,
                       gradient_checkpointing=strategy == "fsdp")
    shard = collate(groups[rank::WORLD], 0)
    parts = micro_batches(shard.seq_lens(), max_rows=kw["micro_batch_size"], max_tokens=kw.get("micro_batch_tokens", 0))
    num_micro, norm = _all_reduce(len(parts), float(shard.mask.sum()))
    assert num_micro == 2 and len(parts) == 2 - rank            # rank 1 runs one empty micro-step
    m = grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), shard, LossConfig(), num_micro=num_micro,
                    global_norm=norm, world_size=WORLD, **kw)
    return model, m


def _equal_to_one_process(rank: int, strategy: str, kw: dict) -> None:
    # several lm_head chunks per micro-batch: the head runs outside the root forward (pipeline/policy.py)
    policy.LOGIT_CHUNK = 5
    groups = random_groups(3, 2, seed=5)           # rank 0 gets 4 rows (lengths 6, 6, 5, 4), rank 1 gets 2 (15, 5)
    ref = tiny_qwen()
    ref_m = grpo_update(ref, torch.optim.SGD(ref.parameters(), lr=1.0), collate(groups, 0), LossConfig(), **kw)
    model, m = _step(rank, strategy, groups, kw)
    torch.testing.assert_close(m["grad_norm"], ref_m["grad_norm"], rtol=1e-5, atol=0)
    if strategy == "fsdp":
        assert model.lm_head.weight is model.model.embed_tokens.weight      # tying survives sharding
        assert type(model.lm_head.weight).__name__ == "DTensor"
    sd = full_state_dict(model)
    if strategy == "fsdp":   # bf16 compute, fp32 reduce: runs on gloo, near the fp32 result, fp32 weights out
        bf16 = full_state_dict(_step(rank, strategy, groups, kw, dtype="bfloat16")[0])
    if rank:
        assert sd is None
        return
    if strategy == "fsdp":
        for k, v in ref.state_dict().items():
            assert bf16[k].dtype == torch.float32
            torch.testing.assert_close(bf16[k], v, atol=5e-3, rtol=0, msg=k)
    assert list(sd) == list(ref.state_dict())                           # HF names, no module./_fsdp
    for k, v in ref.state_dict().items():
        assert type(sd[k]) is torch.Tensor and sd[k].device.type == "cpu"
        torch.testing.assert_close(sd[k], v, atol=1e-5, rtol=0, msg=k)
    if strategy == "ddp":                                               # a copy, never the training tensors
        assert unwrap(model).lm_head.weight.data_ptr() not in {v.data_ptr() for v in sd.values()}


def _ranked(rank: int, world: int, port: int, fn, args: tuple) -> None:
    """One spawned rank: join a gloo group of `world` ranks, run fn(rank, *args), leave."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a collective mismatch (one rank short of a forward) fails in a minute instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, *args)
    finally:
        # gloo's worker threads take the GIL to free their last work item; if the group is freed (a
        # join while this thread holds the GIL) before they have, teardown deadlocks. Seen once on torch 2.13.
        time.sleep(0.2)
        dist.destroy_process_group()


def _spawn(fn, *args, world: int = WORLD) -> None:
    """Run fn(rank, *args) on `world` ranks; a child's exception re-raises here, a hang fails after 5 minutes."""
    ctx = mp.spawn(_ranked, args=(world, _free_port(), fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("ranks still running after 300 s: a collective mismatch or a teardown hang")


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process():
    _spawn(_equal_to_one_process, "ddp", dict(micro_batch_size=2))


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process():
    # token budget, two PPO epochs (no-grad forwards must match across ranks too), tied embeddings,
    # gradient checkpointing and a binding grad clip (the global norm spans both shards)
    _spawn(_equal_to_one_process, "fsdp", dict(micro_batch_size=2, micro_batch_tokens=32, ppo_epochs=2, grad_clip=0.5))


# --- rank-0 loading, the KL reference, one-rank bf16 ---------------------------------------

def _meta_load(rank: int, dirs: list[str]) -> None:
    ids = torch.randint(1, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    for d in dirs:
        full = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        model = build_policy(d, rank=rank, world_size=WORLD, strategy="fsdp", device=torch.device("cpu"))
        assert isinstance(model.lm_head.weight, DTensor)
        tied = full.config.tie_word_embeddings
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied, d   # ties survive to_empty
        for (name, b), b0 in zip(model.named_buffers(), full.buffers()):   # rotary inv_freq: in no state dict
            assert torch.equal(b, b0), name
        # every rank's shards and buffers at work: the same log-probs as the full model
        torch.testing.assert_close(token_logprobs(model, ids, torch.ones_like(ids)),
                                   token_logprobs(full, ids, torch.ones_like(ids)), atol=1e-6, rtol=0)
        sd = full_state_dict(model)
        if rank == 0:
            assert list(sd) == list(full.state_dict())
            for k, v in full.state_dict().items():
                assert torch.equal(sd[k], v), k


@pytest.mark.slow
def test_rank0_loading_onto_meta_ranks_equals_a_full_load(tmp_path):
    dirs = []
    for tie in (True, False):
        dirs.append(str(tmp_path / f"tie_{tie}"))
        tiny_qwen(seed=3, tie=tie).save_pretrained(dirs[-1])
    _spawn(_meta_load, dirs)


def _kl_steps(model, groups, rank: int, world: int):
    """Three GRPO steps with a k3 KL to a reference built from `model` first -> (metrics, reference)."""
    ref = build_reference(model)
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    shard = collate(groups[rank::world], 0)
    cfg, opt, metrics = LossConfig(kl_coef=0.5), torch.optim.SGD(model.parameters(), lr=1.0), []
    for _ in range(3):
        kw = dict(micro_batch_size=2, world_size=world, ref_model=ref)
        if world > 1:
            parts = micro_batches(shard.seq_lens(), max_rows=2)
            num_micro, norm = _all_reduce(len(parts), float(shard.mask.sum()))
            assert num_micro == 2 and len(parts) == 2 - rank            # rank 1 runs one empty micro-step
            kw.update(num_micro=num_micro, global_norm=norm)
        metrics.append(grpo_update(model, opt, shard, cfg, **kw))
    return metrics, ref


def _kl_reference(rank: int) -> None:
    policy.LOGIT_CHUNK = 5
    groups = random_groups(3, 2, seed=5)
    one = tiny_qwen()
    one_m, _ = _kl_steps(one, groups, 0, 1)
    assert one_m[0]["kl"] == 0 < one_m[2]["kl"]          # the reference starts as the policy, then stays behind
    model = wrap_model(tiny_qwen(), strategy="fsdp", device=torch.device("cpu"), world_size=WORLD)
    sharded_m, ref = _kl_steps(model, groups, rank, WORLD)
    assert isinstance(ref, FSDPModule) and isinstance(ref.model.layers[0].mlp.up_proj.weight, DTensor)
    for m, m1 in zip(sharded_m, one_m):
        torch.testing.assert_close(m["grad_norm"], m1["grad_norm"], rtol=1e-5, atol=0)
    sd, ref_sd = full_state_dict(model), full_state_dict(ref)
    if rank == 0:
        for k, v in one.state_dict().items():
            torch.testing.assert_close(sd[k], v, atol=1e-5, rtol=0, msg=k)
        for k, v in tiny_qwen().state_dict().items():              # the reference never trains
            assert torch.equal(ref_sd[k], v), k


@pytest.mark.slow
def test_fsdp2_kl_reference_trains_like_one_process_with_an_empty_micro_batch():
    # rank 1 has one micro-batch of rows and one empty one: its reference forward must still run
    # (a skipped one leaves rank 0's all-gather unmatched; the 60 s gloo timeout fails the test)
    _spawn(_kl_reference)


def _one_rank_bf16(rank: int) -> None:
    groups = random_groups(3, 2, seed=5)
    model = wrap_model(tiny_qwen(), strategy="fsdp", device=torch.device("cpu"), dtype="bfloat16")
    assert isinstance(model, FSDPModule) and all(isinstance(p, DTensor) for p in model.parameters())
    fp32 = tiny_qwen()
    ids = collate(groups, 0).input_ids
    lp, lp32 = (token_logprobs(m, ids, torch.ones_like(ids)) for m in (model, fp32))
    assert not torch.equal(lp, lp32)                                  # computed in bf16 ...
    torch.testing.assert_close(lp, lp32, atol=0.05, rtol=0)           # ... near the fp32 values
    m = grpo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), collate(groups, 0),
                    LossConfig(kl_coef=0.5), micro_batch_size=2, ref_model=build_reference(model, dtype="bfloat16"))
    assert m["optimizer_steps"] == 1 and m["grad_norm"] > 0
    assert all(v.dtype == torch.float32 for v in full_state_dict(model).values())   # fp32 master weights


@pytest.mark.slow
def test_one_rank_group_computes_bf16_through_fsdp2():
    _spawn(_one_rank_bf16, world=1)
