"""DDP and FSDP2 on CPU (gloo, 2 processes): one GRPO step on two shards equals one step on the whole.

Each spawned rank trains its shard (groups[rank::2], as the Learner does) and also runs the
single-process reference on the whole batch, then compares inside the child: an assertion
there fails the test with the child's traceback.
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

from pipeline.grpo import LossConfig
from pipeline.parallel import full_state_dict, no_sync, resolve_strategy, unwrap, wrap_model
from pipeline.policy import collate, grpo_update, micro_batches
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


def _worker(rank: int, strategy: str, port: int, kw: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a collective mismatch (one rank short of a forward) fails in a minute instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
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
    finally:
        # gloo's worker threads take the GIL to free their last work item; if the group is freed (a
        # join while this thread holds the GIL) before they have, teardown deadlocks. Seen once on torch 2.13.
        time.sleep(0.2)
        dist.destroy_process_group()


def _spawn(strategy: str, **kw) -> None:
    """Run _worker on WORLD ranks; a child's exception re-raises here, a hang fails after 5 minutes."""
    ctx = mp.spawn(_worker, args=(strategy, _free_port(), kw), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("ranks still running after 300 s: a collective mismatch or a teardown hang")


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process():
    _spawn("ddp", micro_batch_size=2)


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process():
    # token budget, two PPO epochs (no-grad forwards must match across ranks too), tied embeddings,
    # gradient checkpointing and a binding grad clip (the global norm spans both shards)
    _spawn("fsdp", micro_batch_size=2, micro_batch_tokens=32, ppo_epochs=2, grad_clip=0.5)
