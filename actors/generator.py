"""Generator: pulls requests, syncs to the newest published weights, samples n per prompt."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from queue import Empty

import ray

from pipeline.engines.base import SamplingConfig, make_engine
from pipeline.transport import Slot, TornRead, views_of
from pipeline.types import Prompt, Request, RolloutGroup


@dataclass(frozen=True)
class Rollouts:
    """What one request produced, as it travels to the rewarder (inside an ObjectRef)."""

    groups: tuple[RolloutGroup, ...]
    gen_seconds: float
    tokens: int
    sync_seconds: float = 0.0      # weight loading done before this request


class Generator:
    def __init__(self, cfg, model_dir: str, tokenizer_dir: str, store, prompt_q=None, rollout_q=None,
                 index: int = 0, engine=None, version: int = 0, selector=None):
        import torch
        torch.set_num_threads(max(1, int(cfg.rollout.num_cpus)))
        self.cfg, self.store, self.prompt_q, self.rollout_q, self.index = cfg, store, prompt_q, rollout_q, index
        self.selector = selector      # told what we hold, so a restart after our death re-issues it
        self.engine = engine or make_engine(cfg.rollout.engine, model_dir, tokenizer_dir, cfg=cfg)
        self.version, self.requests, self.stopped = version, 0, False   # version: what model_dir holds
        self.lock = threading.Lock()          # one engine: evaluation and rollout take turns
        self.sync_seconds = 0.0
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def sync_weights(self, min_version: int = 0) -> int:
        """Load the newest published weights if they are newer than ours."""
        for attempt in range(3):   # a slot rewritten while we read it: the store has a newer one
            version, *payload = ray.get(self.store.latest.remote(self.node))
            if version <= self.version:
                break
            try:
                self._load(version, payload)
                break
            except TornRead:
                if attempt == 2:   # the engine may hold a torn mix: never generate with it
                    raise RuntimeError(f"weights v{version} were rewritten under every read (3 tries)") from None
        if self.version < min_version:
            raise RuntimeError(f"request needs policy v{min_version}, store has v{version}")
        return self.version

    def _load(self, version: int, payload) -> None:
        """Fetch and stage outside the engine lock (a rollout may be running), load under it."""
        staged = self._stage(payload)
        with self.lock:
            self._apply(version, staged)

    def _apply(self, version: int, staged) -> None:
        """Load staged weights into the engine (the caller holds the engine lock)."""
        if version == self.version:
            return
        t0 = time.perf_counter()
        if isinstance(staged, Slot):
            self.engine.load_slot(staged)
        else:
            self.engine.update_weights(staged)
        self.sync_seconds += time.perf_counter() - t0
        self.version = version

    def _stage(self, payload):
        """A Slot on this node as it is; otherwise the weights as tensors: the object store's
        state (weight_sync=object_store), or a remote node's slot bytes viewed in place."""
        slot, remote = payload
        if isinstance(slot, Slot):
            if slot.node in ("", self.node) and os.path.exists(slot.path):
                return slot
            if remote is None:
                raise RuntimeError(f"weights v{slot.version} are in {slot.path} on node {slot.node[:8]}, "
                                   "not readable here, and no copy was put in the object store")
            return views_of(ray.get(remote[0]))[0]
        return ray.get(slot[0])

    def generate(self, req: Request) -> Rollouts:
        r = self.cfg.rollout
        sampling = SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                  seed=hash((self.cfg.run.seed, self.index, self.version, self.requests)) % 2**31)
        synced = self.sync_seconds
        while True:
            self.sync_weights(req.min_version)
            with self.lock:
                if self.version < req.min_version:   # an evaluation loaded an older version meanwhile
                    continue
                t0 = time.perf_counter()
                out = self.engine.generate([p.token_ids for p in req.prompts], sampling)
                seconds, version = time.perf_counter() - t0, self.version
                break
        self.requests += 1
        probes = req.probe or (False,) * len(req.prompts)
        groups = tuple(RolloutGroup(t, p, tuple(s), version, probe)
                       for t, p, s, probe in zip(req.tickets, req.prompts, out, probes))
        tokens = sum(len(s.token_ids) for g in groups for s in g.samples)
        return Rollouts(groups, seconds, tokens, self.sync_seconds - synced)

    def run(self) -> None:
        """The generation loop (a long-running actor call): request in, ObjectRef out."""
        while not self.stopped:
            req = self._take()
            if req is None:
                continue
            self._maybe_stall()
            self.rollout_q.put([ray.put(self.generate(req))])   # a list: Ray would inline a bare ref
            self._holding(())

    def _maybe_stall(self) -> None:
        """faults.stall=generator:<index>@step=N: hang inside a request once at policy version N."""
        from pipeline.faults import parse
        if any(f.stage == "generator" and f.index == self.index and self.version >= f.step
               for f in parse(self.cfg.faults.stall)):
            while True:
                time.sleep(1.0)

    def _take(self) -> Request | None:
        """The next request: through the selector when wired (it notes what we hold in the same
        call), else straight from the prompt queue."""
        if self.selector is None:
            try:
                return self.prompt_q.get(timeout=0.5)
            except Empty:
                return None
        return ray.get(self.selector.take.remote(self.index, 0.1))

    def _holding(self, tickets) -> None:
        if self.selector is not None:
            ray.get(self.selector.holding.remote(self.index, tickets))

    def pid(self) -> int:
        """The actor's process id (fault tests kill it from outside, as a crash would)."""
        return os.getpid()

    def env(self, name: str) -> str | None:
        """An environment variable as this actor sees it (placement tests)."""
        return os.environ.get(name)

    def evaluate(self, prompts: list[Prompt], max_new_tokens: int, weights=None, k: int = 0,
                 top_p: float | None = None) -> tuple[int, list[str]]:
        """Responses of policy `weights` = (version, payload, remote bytes) as the store's publish
        returned them (the driver pins that version until it is done); None = what we hold.

        k = 0: one greedy response per prompt. k > 0: k samples per prompt at the rollout
        temperature and `top_p` (None = rollout.top_p) for avg@k, prompt-major, seeded by
        (run.seed, generator, version) so a rerun reproduces it. The evaluation runs right
        after the learner published the version, so loading it is the sync the next rollout
        would do anyway; only a generator already on a newer version loads back and forth.
        """
        r = self.cfg.rollout
        staged = self._stage(weights[1:]) if weights is not None and weights[0] != self.version else None
        with self.lock:
            if weights is not None and weights[0] != self.version:   # usually the sync the next rollout does anyway
                self._apply(weights[0], staged if staged is not None else self._stage(weights[1:]))
            sampling = (SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens) if k == 0 else
                        SamplingConfig(n=k, temperature=r.temperature, top_p=r.top_p if top_p is None else top_p,
                                       max_new_tokens=max_new_tokens,
                                       seed=hash((self.cfg.run.seed, self.index, self.version, -1)) % 2**31))
            out = self.engine.generate([p.token_ids for p in prompts], sampling)
            return self.version, [s.text for samples in out for s in samples]

    def stop(self) -> None:
        self.stopped = True
