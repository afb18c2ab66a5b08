"""PromptSelector: owns the data cursor, the selector rule, the ledger and step windows.

It keeps the generators fed: whenever the staleness bound allows more batches than
the pipeline holds, it picks prompts (GRESO skips happen here, before rollout) and puts
requests on the prompt queue. Every group's rewards come back here (history, ledger,
per-step metrics), and the learner settles each step here.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from queue import Full

import numpy as np

from pipeline.batching import Ledger, rollout_demand
from pipeline.selection import EASY, HARD, DataCursor, classify, make_selector, pick
from pipeline.types import Prompt, Request


class PromptSelector:
    def __init__(self, cfg, prompts: list[Prompt], prompt_q=None):
        self.cfg, self.prompts, self.prompt_q = cfg, prompts, prompt_q
        self.uids = [p.uid for p in prompts]
        self.batch_size = cfg.train.batch_size
        self.selector = make_selector(cfg.selector, batch_size=self.batch_size,
                                      sampling_batch=cfg.rollout.sampling_batch, seed=cfg.run.seed)
        self.cursor = DataCursor(len(prompts), seed=cfg.run.seed)
        self.ledger = Ledger()
        self.version = 0
        self.recent_zv: deque[bool] = deque(maxlen=4 * self.batch_size)   # zero-variance ratio estimate
        self.window: Counter = Counter()                 # this step's counters, reset at settle
        self.pending: deque[Request] = deque()           # issued requests the queue had no room for
        self.lock = threading.Lock()
        self.stopped = False

    # --- issuing -----------------------------------------------------------
    def zero_variance_ratio(self) -> float:
        return float(np.mean(self.recent_zv)) if self.recent_zv else 0.0

    def issue(self) -> list[Request]:
        """Pick and ticket as many prompts as the pipeline is missing; returns new requests."""
        c, zvr = self.ledger.count, self.zero_variance_ratio()
        steps_allowed = min(self.cfg.trainer.total_steps, self.version + 1 + self.cfg.pipeline.max_staleness)
        yield_rate = 1.0 - zvr if self.selector.post_filter else 1.0
        missing = rollout_demand(steps_allowed=steps_allowed, batch_size=self.batch_size,
                                 groups_committed=c["trained"] + c["queued"] + c["carried"],
                                 prompts_in_rollout=c["rollout"], yield_rate=yield_rate)
        n = self.selector.sampling_size(missing, zvr)
        if n == 0:
            return []
        picked = pick(self.selector, self.cursor, self.uids, n)
        self.window.update({f"skipped_{k}": v for k, v in picked.skipped.items()})
        self.window["prompts"] += n
        tickets = self.ledger.issue(n)
        size = self.cfg.rollout.request_size
        return [Request(tuple(tickets[i:i + size]), tuple(self.prompts[j] for j in picked.indices[i:i + size]),
                        min_version=self.version) for i in range(0, n, size)]

    def pump(self) -> None:
        """Issue what is missing and push pending requests without ever blocking."""
        with self.lock:
            self.pending.extend(self.issue())
            while self.pending:
                try:
                    self.prompt_q.put_nowait(self.pending[0])
                except Full:
                    break
                self.pending.popleft()

    def run(self, interval_s: float = 0.02) -> None:
        """The selector's loop (a long-running actor call); stop() ends it."""
        while not self.stopped:
            self.pump()
            time.sleep(interval_s)

    def stop(self) -> None:
        self.stopped = True

    # --- feedback ----------------------------------------------------------
    def report(self, results: list[dict], batches: list[tuple[list[int], list[int]]],
               gen_seconds: float = 0.0, tokens: int = 0, sync_seconds: float = 0.0) -> None:
        """From the rewarder, per request: one dict per group {ticket, uid, rewards, fate,
        response_len}, then (queued, dropped-stale) tickets of each batch it cut."""
        with self.lock:
            for r in results:
                kind = classify(r["rewards"])
                self.selector.observe(r["uid"], r["rewards"])
                self.ledger.move([r["ticket"]], r["fate"])
                self.recent_zv.append(kind != "mixed")
                self.window[kind] += 1
                self.window["samples"] += len(r["rewards"])
                self.window["reward_sum"] += sum(r["rewards"])
                self.window["response_len_sum"] += r["response_len"]
            for queued, stale in batches:
                self.ledger.move(stale, "dropped_stale")
                self.ledger.move(queued, "queued")
            self.window["gen_seconds"] += gen_seconds
            self.window["sync_seconds"] += sync_seconds
            self.window["tokens"] += tokens

    def settle(self, version: int, trained: list[int], stale: list[int]) -> dict:
        """From the learner after each step: ledger fates, controller update, metrics snapshot."""
        with self.lock:
            self.ledger.move(trained, "trained")
            self.ledger.move(stale, "dropped_stale")
            self.version = version
            w = self.window
            groups = w[EASY] + w[HARD] + w["mixed"]
            easy, hard = (w[EASY] / groups, w[HARD] / groups) if groups else (0.0, 0.0)
            self.selector.end_step(easy, hard)
            snapshot = self._snapshot(w, groups, easy, hard)
            self.window = Counter()
            return snapshot

    def _snapshot(self, w: Counter, groups: int, easy: float, hard: float) -> dict:
        p = getattr(self.selector, "p", {})
        return {"rollout/prompts": w["prompts"], "rollout/groups": groups, "rollout/samples": w["samples"],
                "reward/mean": w["reward_sum"] / w["samples"] if w["samples"] else 0.0,
                "rollout/zero_variance_ratio": easy + hard, "rollout/easy_ratio": easy,
                "rollout/hard_ratio": hard, "rollout/response_len_mean":
                w["response_len_sum"] / w["samples"] if w["samples"] else 0.0,
                "time/generate": w["gen_seconds"], "time/weight_sync": w["sync_seconds"],
                "rollout/tokens": w["tokens"],
                "rollout/tokens_per_s": w["tokens"] / w["gen_seconds"] if w["gen_seconds"] else 0.0,
                "selector/skipped_easy": w["skipped_easy"], "selector/skipped_hard": w["skipped_hard"],
                "selector/p_easy": p.get(EASY, 1.0), "selector/p_hard": p.get(HARD, 1.0),
                "selector/epoch": self.cursor.epoch, **self.ledger.metrics()}

    def state_dict(self) -> dict:
        with self.lock:
            return {"selector": self.selector.state_dict(), "cursor": self.cursor.state_dict(),
                    "ledger": self.ledger.state_dict(), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        with self.lock:
            self.selector.load_state_dict(state["selector"])
            self.cursor = DataCursor.from_state(state["cursor"])
            self.ledger.load_state_dict(state["ledger"])
            self.version = state["version"]
