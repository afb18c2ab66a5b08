"""A learner restored from its checkpoint files takes the same next steps as one never stopped.

Two steps, save (pipeline.learner_state), two more; then a fresh learner with other initial
weights loads the files and takes the same two steps: losses within 1e-6 and identical weights
afterwards, which needs the optimiser moments, the LR schedule and the master weights restored.
One process, then DDP and FSDP2 over gloo with 2 ranks (FSDP2 writes per-rank shards).
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.learner import Learner
from pipeline.learner_state import load_learner, save_learner
from pipeline.parallel import full_state_dict, wrap_model
from pipeline.types import ScoredGroup, TrainBatch
from tests.actors.helpers import tiny_cfg
from tests.unit.test_parallel import _free_port
from tests.unit.test_policy import random_groups, tiny_qwen


def _batches(k: int) -> list[TrainBatch]:
    """k batches of 4 groups; version 0 data, accepted at any lag (max_staleness is large)."""
    return [TrainBatch(i, tuple(random_groups(4, 2, seed=10 + i))) for i in range(k)]


def _learner(strategy: str, seed: int, rank: int, world: int) -> Learner:
    cfg = tiny_cfg("pipeline.max_staleness=100", "train.lr=1e-2", "train.ppo_epochs=2",
                   f"train.num_workers={world}")
    model = wrap_model(tiny_qwen(seed), strategy=strategy, device=torch.device("cpu"), world_size=world)
    return Learner(cfg, model, rank=rank, world_size=world)


def _resume_matches(strategy: str, directory: Path, rank: int = 0, world: int = 1) -> None:
    b = _batches(4)
    first = _learner(strategy, 0, rank, world)
    for batch in b[:2]:
        first.step(batch)
    save_learner(directory, first.model, first.optimizer, first.scheduler, rank=rank)
    if world > 1:
        dist.barrier()
    straight = [first.step(batch)[0]["train/loss"] for batch in b[2:]]
    second = _learner(strategy, 1, rank, world)          # other initial weights: loading must matter
    load_learner(directory, second.model, second.optimizer, second.scheduler, rank=rank)
    resumed = [second.step(batch)[0]["train/loss"] for batch in b[2:]]
    assert resumed == pytest.approx(straight, abs=1e-6), (strategy, rank)
    a, c = full_state_dict(first.model), full_state_dict(second.model)
    if rank == 0:
        for k in a:
            torch.testing.assert_close(c[k], a[k], atol=1e-6, rtol=0, msg=k)
        assert second.scheduler.get_last_lr() == first.scheduler.get_last_lr()


def test_single_process_resume_is_exact(tmp_path):
    _resume_matches("ddp", tmp_path / "learner")
    assert sorted(p.name for p in (tmp_path / "learner").iterdir()) == [
        "model_rank0.safetensors", "optim_rank0.json", "optim_rank0.safetensors"]


def _worker(rank: int, strategy: str, port: int, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        _resume_matches(strategy, Path(directory), rank, 2)
    finally:
        time.sleep(0.2)   # see tests/unit/test_parallel.py: gloo teardown
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,files", [("ddp", 3), ("fsdp", 6)])
def test_two_rank_resume_is_exact(tmp_path, strategy, files):
    ctx = mp.spawn(_worker, args=(strategy, _free_port(), str(tmp_path / "learner")), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("ranks still running after 300 s")
    assert len(list((tmp_path / "learner").iterdir())) == files   # FSDP2: one set per rank; DDP: rank 0's
