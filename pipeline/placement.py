"""Placement: which node each generator and the learner's workers go to (pure, no Ray).

The rule, for GPU runs that ask for whole GPUs per actor:
- the learner's workers are packed on one node (their FSDP2 all-gathers and reduce-scatters
  run every layer: keep them on NVLink, off the network) when one node holds them all;
- the generators go to the other nodes first, and only then to GPUs the learner left free
  on its node, so on 2 x 8 GPUs the learner has one node and the eight generators the other;
- nothing shares a GPU: a generator asking for num_gpus=1 gets a GPU the learner does not.
Fractional GPUs (rollout.num_gpus < 1 or train.gpus_per_worker < 1) ask for sharing on
purpose: then Ray places the actors where they fit, and this module does not pin them.
Generators with rollout.num_gpus=0 see no GPU at all (CUDA_VISIBLE_DEVICES=""): Ray leaves
CUDA_VISIBLE_DEVICES alone for actors assigned no GPU (ray/_private/utils.py,
set_visible_accelerator_ids skips empty ids unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1),
and vLLM would otherwise take GPU 0 at its memory share, unaccounted.
Test: `pytest tests/unit/test_placement.py -q`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Node:
    id: str
    gpus: float


@dataclass
class Plan:
    learner_node: str | None = None                  # None: Ray places the workers (PACK)
    generator_nodes: list[str | None] = field(default_factory=list)
    why: str = ""                                    # one line for the log

    def learner_strategy(self) -> str:
        return "STRICT_PACK" if self.learner_node else "PACK"

    def learner_label(self) -> dict[str, str] | None:
        """Ray Train's label_selector pinning every worker to the learner's node (ray/train/v2/api/config.py)."""
        return {"ray.io/node-id": self.learner_node} if self.learner_node else None


def plan(nodes: list[Node], *, generators: int, gen_gpus: float, workers: int, worker_gpus: float,
         use_gpu: bool) -> Plan:
    """Where each generator and the learner go; raises ValueError when the GPUs cannot hold them
    without sharing."""
    if not use_gpu or gen_gpus == 0 or gen_gpus % 1 or (worker_gpus % 1 if use_gpu else 0):
        return Plan(None, [None] * generators, "Ray places the actors (no whole-GPU actors to separate)")
    need_learner = workers * worker_gpus
    free = {n.id: n.gpus for n in nodes}
    home = next((n.id for n in sorted(nodes, key=lambda n: (n.gpus < need_learner, -n.gpus, n.id))
                 if n.gpus >= need_learner), None)
    if home is not None:
        free[home] -= need_learner
    # other nodes first, the learner's node last; fill a node before moving on
    order = sorted(free, key=lambda i: (i == home, -free[i], i))
    out = []
    for _ in range(generators):
        node = next((i for i in order if free[i] >= gen_gpus), None)
        if node is None:
            have = sum(n.gpus for n in nodes)
            raise ValueError(f"placement: {generators} generators x {gen_gpus:g} GPUs + {workers} learner workers "
                             f"x {worker_gpus:g} GPUs do not fit {have:g} GPUs on {len(nodes)} nodes without sharing; "
                             "lower rollout.num_generators or train.num_workers, or share GPUs with fractional "
                             "rollout.num_gpus / train.gpus_per_worker")
        free[node] -= gen_gpus
        out.append(node)
    why = (f"learner's {workers} workers packed on node {home[:8]}, generators on "
           f"{', '.join(sorted({n[:8] for n in out}))}" if home else
           f"no node holds all {workers} learner workers: Ray spreads them; generators on "
           f"{', '.join(sorted({n[:8] for n in out}))}")
    return Plan(home, out, why)


def generator_env(gen_gpus: float) -> dict[str, str]:
    """Environment for a generator actor: no GPU visible when it asked for none."""
    return {"CUDA_VISIBLE_DEVICES": ""} if gen_gpus == 0 else {}
