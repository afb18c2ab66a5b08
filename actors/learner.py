"""Learner: a Ray Train TorchTrainer whose loop pulls train batches from a queue.

Each worker loads the policy, takes its shard of every batch (groups[rank::W]), runs the
GRPO update from pipeline.policy (DDP over gloo on CPU), and rank 0 publishes the new
weights (version = steps done) to the WeightStore, settles the ledger with the selector
and pushes the step's metrics to the driver. The model comes from `build_policy` (FSDP2 on GPU,
rank 0 loading for the others), the KL reference from `build_reference` (pipeline/parallel.py).
"""
from __future__ import annotations

import math
import time
from collections import Counter

import ray
import torch
import torch.distributed as dist

from actors.weights import Publisher
from pipeline.batching import is_stale, staleness
from pipeline.lifecycle import eval_due
from pipeline.grpo import LossConfig
from pipeline.parallel import build_policy, build_reference, full_state_dict, resolve_strategy
from pipeline.policy import collate, grpo_update, micro_batches, mini_batch_slices
from pipeline.types import TrainBatch


def lr_factor(step: int, total: int, schedule: str, min_ratio: float) -> float:
    """constant, or cosine decay from 1 to min_ratio over the run (a calmer end for the final policy)."""
    if schedule == "constant" or total <= 1:
        return 1.0
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


class Learner:
    """One worker's model, optimiser and step logic; no Ray here, so tests build it directly."""

    def __init__(self, cfg, model, *, rank: int = 0, world_size: int = 1, pad_id: int = 0):
        t = cfg.train
        self.cfg, self.model, self.rank, self.world_size, self.pad_id = cfg, model, rank, world_size, pad_id
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, cfg.trainer.total_steps, t.lr_schedule,
                                                   t.lr_min_ratio))
        self.loss_cfg = LossConfig(clip_low=t.clip_low, clip_high=t.clip_high, agg=t.loss_agg,
                                   kl_coef=t.kl_coef, tis_cap=t.tis_cap or None, entropy_coef=t.entropy_coef,
                                   clip_ratio_c=t.clip_ratio_c)
        self.num_mini = t.batch_size // (t.mini_batch_size or t.batch_size)   # optimiser steps per batch
        # built before Saver.restore, so a resumed run keeps the KL to the initial policy
        self.ref_model = build_reference(model, dtype=cfg.model.dtype) if t.kl_coef > 0 else None
        self.version = 0

    def unwrapped(self):
        return getattr(self.model, "module", self.model)

    def step(self, batch: TrainBatch) -> tuple[dict, list[int], list[int]]:
        """One learner step; returns (metrics, trained tickets, stale tickets)."""
        S = self.cfg.pipeline.max_staleness
        fresh = [g for g in batch.groups if not is_stale(g.group.version, self.version, S)]
        stale = [g for g in batch.groups if is_stale(g.group.version, self.version, S)]
        lags = [staleness(g.group.version, self.version) for g in fresh] or [0]
        shard = collate(fresh[self.rank::self.world_size], self.pad_id, self.cfg.train.adv_norm)
        mb, mb_tokens = self.cfg.train.micro_batch_size, self.cfg.train.micro_batch_tokens
        counts, norms = [], []
        for rows in mini_batch_slices(len(shard), self.num_mini):   # per optimiser step
            part = shard.rows(rows)
            counts.append(len(micro_batches(part.seq_lens(), max_rows=mb, max_tokens=mb_tokens)))
            norms.append(float(part.mask.sum()) if self.loss_cfg.agg == "token" else len(part))
        num_micro, norm = self._all_reduce(counts, norms)
        m = grpo_update(self.model, self.optimizer, shard, self.loss_cfg, micro_batch_size=mb,
                        micro_batch_tokens=mb_tokens, num_mini=self.num_mini,
                        ppo_epochs=self.cfg.train.ppo_epochs, grad_clip=self.cfg.train.grad_clip,
                        num_micro=[max(n, 1) for n in num_micro], global_norm=[x or 1.0 for x in norm],
                        world_size=self.world_size, ref_model=self.ref_model, temperature=self.cfg.rollout.temperature)
        self.version += 1
        metrics = {f"train/{k}": v for k, v in m.items()}
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()          # once per batch: the lr is constant across its ppo_epochs
        metrics.update({"train/effective_groups": len(fresh), "train/dropped_stale": len(stale),
                        "train/signal_groups": sum(not g.zero_variance for g in fresh),
                        "train/response_len_mean": float(shard.response_len.mean()) if len(shard) else 0.0,
                        "staleness/mean": sum(lags) / len(lags), "staleness/max": max(lags)})
        if fresh:  # groups trained at each lag: pipeline.report sums these into the staleness histogram
            metrics.update({f"staleness/groups_{k}": n for k, n in sorted(Counter(lags).items())})
        return metrics, [g.group.ticket for g in fresh], [g.group.ticket for g in stale]

    def _all_reduce(self, num_micro: list[int], norm: list[float]) -> tuple[list[int], list[float]]:
        """Per mini-batch: max micro-batches and total loss denominator across workers."""
        if self.world_size == 1 or not dist.is_initialized():
            return num_micro, norm
        # on the model's device: NCCL (GPU) reduces only device tensors, gloo takes CPU ones
        t = torch.tensor([num_micro, norm], dtype=torch.float64, device=next(self.model.parameters()).device)
        mx, total = t.clone(), t.clone()
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return [int(x) for x in mx[0].tolist()], total[1].tolist()

    def state_dict_for_publish(self) -> dict | None:
        """Full CPU weights under HF names on rank 0, None elsewhere; every rank must call it (FSDP gathers)."""
        return full_state_dict(self.model)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: the learner's side of the paper's loop."""
    from omegaconf import OmegaConf
    import ray.train
    import ray.train.torch

    cfg = OmegaConf.create(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed)
    # fp32 master weights; with model.dtype=bfloat16 FSDP2 computes in bf16 (see pipeline/parallel.py)
    model = build_policy(config["model_dir"], rank=rank, world_size=world,
                         strategy=resolve_strategy(cfg.train.strategy, cfg.train.use_gpu),
                         device=ray.train.torch.get_device(), dtype=cfg.model.dtype,
                         gradient_checkpointing=cfg.train.gradient_checkpointing)
    learner = Learner(cfg, model, rank=rank, world_size=world, pad_id=config["pad_id"])
    saver = Saver(cfg, config, learner, rank)
    saver.restore()
    publisher = Publisher(cfg, config["store"], config["run_dir"]) if rank == 0 else None
    selector, train_q, metrics_q = (config[k] for k in ("selector", "train_q", "metrics_q"))
    last = time.perf_counter()
    for step in range(learner.version + 1, cfg.trainer.total_steps + 1):
        t0 = time.perf_counter()
        # rank 0 pulls the batch and broadcasts the data itself: an ObjectRef pickled through
        # torch.distributed loses its owner and ray.get on rank 1 hangs (seen with 2 workers)
        box = [ray.get(train_q.get()[0]) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        batch = box[0]
        t1 = time.perf_counter()
        metrics, trained, stale = learner.step(batch)
        t2 = time.perf_counter()
        state = learner.state_dict_for_publish()  # a collective under FSDP: every rank gathers
        row = {}
        if rank == 0:
            # an evaluation will read this version: pinned, so its slot is not rewritten before it does
            weights = publisher.publish(learner.version, state, pin=eval_due(cfg, step))
            row = {**ray.get(selector.settle.remote(learner.version, trained, stale)), **metrics}
            now = time.perf_counter()
            row.update({"step": step, "policy_version": learner.version, "time/wait_learner": t1 - t0,
                        "time/train": t2 - t1, "time/weight_publish": now - t2, "time/step": now - last})
            last = now
        stop = row.pop("control/stop", False)
        decision = [saver.due(step) or stop, stop]   # rank 0 decides; every rank saves (FSDP gathers)
        if world > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            t3 = time.perf_counter()
            saver.save(step, row, state)
            row["time/checkpoint"] = time.perf_counter() - t3
        if rank == 0:
            metrics_q.put({**row, "weights": weights, "stopping": decision[1]})
        if decision[1]:
            return
        _inject_fault(cfg, step, rank)


def _inject_fault(cfg, step: int, rank: int) -> None:
    """faults.kill=learner[:rank]@step=N: this Ray Train worker SIGKILLs itself after step N."""
    import os
    import signal
    from pipeline.faults import parse
    if any(f.stage == "learner" and f.index == rank and f.step == step for f in parse(cfg.faults.kill)):
        os.kill(os.getpid(), signal.SIGKILL)


class Saver:
    """The learner's checkpoints: when they are due, writing one at one policy version, restoring one.

    Rank 0 gathers the policy (HF format), every rank writes its learner state, rank 0 adds the
    pipeline state (asked of the rewarder, which holds its own carried groups and asks the
    selector, so the two are one consistent cut) and the metrics row, then commits: manifest,
    rename. The committed directory is reported to Ray Train as this step's checkpoint (an
    upload function that leaves it in place: ray/train/v2/_internal/execution/context.py calls
    it instead of copying), so `ray.train.get_checkpoint()` and Ray Train's pruning
    (CheckpointConfig.num_to_keep = trainer.keep_checkpoints) see the same directories.
    """

    def __init__(self, cfg, config: dict, learner: Learner, rank: int):
        from pathlib import Path
        self.cfg, self.learner, self.rank = cfg, learner, rank
        self.run_dir = Path(config["run_dir"])
        self.resume_from = config.get("resume_from")
        self.tokenizer_dir, self.rewarder = config["tokenizer_dir"], config["rewarder"]
        self.tokenizer = None     # loaded on the first save, kept: every checkpoint writes its files

    def due(self, step: int) -> bool:
        every = self.cfg.trainer.save_every
        return step == self.cfg.trainer.total_steps or bool(every and step % every == 0)

    def restore(self) -> None:
        """Load the checkpoint this run resumes from (the driver's choice; Ray Train's own
        restore points at the same directory unless its newest lost its manifest)."""
        import logging
        from pathlib import Path
        import ray.train
        from pipeline.checkpoint import read_manifest
        from pipeline.learner_state import load_learner
        ckpt = ray.train.get_checkpoint()
        path = Path(self.resume_from) if self.resume_from else (Path(ckpt.path) if ckpt else None)
        if path is None:
            return
        if ckpt and Path(ckpt.path).resolve() != path.resolve() and self.rank == 0:
            logging.getLogger(__name__).warning("Ray Train's latest checkpoint %s is not the one resumed "
                                                "from (%s): using the latter", ckpt.path, path)
        load_learner(path / "learner", self.learner.model, self.learner.optimizer, self.learner.scheduler,
                     rank=self.rank)
        self.learner.version = read_manifest(path)["step"]

    def save(self, step: int, row: dict, state: dict | None) -> None:
        """`state`: the full weights on rank 0 that were just published (no second gather)."""
        import ray.train
        from pipeline import checkpoint as ck
        from pipeline.learner_state import save_learner, save_policy
        final = ck.step_dir(self.run_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        save_learner(tmp / "learner", self.learner.model, self.learner.optimizer, self.learner.scheduler,
                     rank=self.rank)
        if self.rank == 0:
            if self.tokenizer is None:
                from transformers import AutoTokenizer
                self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            save_policy(tmp / "policy", self.learner.unwrapped(), state, self.cfg.model.dtype, self.tokenizer)
        if dist.is_initialized():
            dist.barrier()   # every rank's learner files are in tmp before rank 0 commits
        checkpoint = None
        if self.rank == 0:
            from omegaconf import OmegaConf
            pipeline_state = ray.get(self.rewarder.checkpoint_state.remote())
            ck.write_json(tmp / "pipeline.json", {**pipeline_state, "version": self.learner.version,
                                                  "row": {k: v for k, v in row.items() if k != "weights"}})
            ck.commit(tmp, final, step=step, config=OmegaConf.to_container(self.cfg))
            if step == self.cfg.trainer.total_steps:
                ck.export_final(final / "policy", self.run_dir / "final")
            checkpoint = ray.train.Checkpoint.from_directory(str(final))
        ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=final.name,
                         checkpoint_upload_fn=(lambda c, _name: c) if checkpoint else None)
