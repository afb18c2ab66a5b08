"""PromptSelector: owns the data cursor, the selector rule, the ledger and step windows.

It keeps the generators fed: whenever the staleness bound allows more batches than
the pipeline holds, it picks prompts (GRESO skips happen here, before rollout) and puts
requests on the prompt queue. Every group's rewards come back here (history, ledger,
per-step metrics), and the learner settles each step here.

Two measurements no peer makes live here too: probes (a random share of skipped prompts
rolled out anyway and never trained on) give selector/false_skip_rate, and the solve rate
each prompt had when it was issued gives rollout/ vs train/difficulty_mean.
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
        self.probes: Counter = Counter()                 # whole-run probe outcomes: false skips per reason
        self.prior_rate: dict[int, float | None] = {}    # ticket -> solve rate known when it was issued
        self.probe_why: dict[int, str] = {}              # probe ticket -> why its prompt was skipped
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
        indices = picked.indices + [i for i, _ in picked.probes]
        tickets = self.ledger.issue(len(indices))
        for t, i in zip(tickets, picked.indices):
            self.prior_rate[t] = self._count_rate("rollout", self.selector.solve_rate(self.uids[i]))
        for t, (_, why) in zip(tickets[n:], picked.probes):
            self.probe_why[t] = why
        probe = (False,) * n + (True,) * len(picked.probes)
        size = self.cfg.rollout.request_size
        return [Request(tuple(tickets[i:i + size]), tuple(self.prompts[j] for j in indices[i:i + size]),
                        min_version=self.version, probe=probe[i:i + size]) for i in range(0, len(indices), size)]

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
               gen_seconds: float = 0.0, tokens: int = 0, sync_seconds: float = 0.0,
               counts: dict | None = None) -> None:
        """From the rewarder, per request: one dict per group {ticket, uid, rewards, fate,
        response_len}, then (queued, dropped-stale) tickets of each batch it cut, and its
        grading counters since the last report (reward/timeouts, reward/errors)."""
        with self.lock:
            for r in results:
                kind = classify(r["rewards"])
                self.selector.observe(r["uid"], r["rewards"])
                self.ledger.move([r["ticket"]], r["fate"])
                if r["fate"] == "probed":     # measured apart: no controller, ratio or sample counts
                    why = self.probe_why.pop(r["ticket"])
                    self.probes.update({why: 1, f"false_{why}": kind == "mixed"})
                    self.window["probe_samples"] += len(r["rewards"])
                    continue
                if r["fate"] == "filtered":
                    self._retire([r["ticket"]])
                self.recent_zv.append(kind != "mixed")
                self.window[kind] += 1
                self.window["samples"] += len(r["rewards"])
                self.window["reward_sum"] += sum(r["rewards"])
                self.window["response_len_sum"] += r["response_len"]
            for queued, stale in batches:
                self.ledger.move(stale, "dropped_stale")
                self.ledger.move(queued, "queued")
                self._retire(stale)
            self.window["gen_seconds"] += gen_seconds
            self.window["sync_seconds"] += sync_seconds
            self.window["tokens"] += tokens
            self.window.update(counts or {})

    def settle(self, version: int, trained: list[int], stale: list[int]) -> dict:
        """From the learner after each step: ledger fates, controller update, metrics snapshot."""
        with self.lock:
            self.ledger.move(trained, "trained")
            self.ledger.move(stale, "dropped_stale")
            self.version = version
            self._retire(stale)
            self._retire(trained, into="train")
            w = self.window
            groups = w[EASY] + w[HARD] + w["mixed"]
            easy, hard = (w[EASY] / groups, w[HARD] / groups) if groups else (0.0, 0.0)
            if groups:   # a step that rolled nothing out says nothing about p_easy / p_hard
                self.selector.end_step(easy, hard)
            snapshot = self._snapshot(w, groups, easy, hard)
            self.window = Counter()
            return snapshot

    def _count_rate(self, key: str, rate: float | None) -> float | None:
        """Add a prompt's issue-time solve rate to this window's `key` mean (rates are None
        for prompts without history)."""
        if rate is not None:
            self.window[f"{key}_rate_sum"] += rate
            self.window[f"{key}_rate_n"] += 1
        return rate

    def _retire(self, tickets, into: str | None = None) -> None:
        """Tickets reached a final fate: forget their issue-time solve rate, counting it `into`."""
        for t in tickets:
            rate = self.prior_rate.pop(t, None)
            if into:
                self._count_rate(into, rate)

    def _snapshot(self, w: Counter, groups: int, easy: float, hard: float) -> dict:
        p = getattr(self.selector, "p", {})
        return {"rollout/prompts": w["prompts"], "rollout/groups": groups, "rollout/samples": w["samples"],
                "reward/mean": w["reward_sum"] / w["samples"] if w["samples"] else 0.0,
                "rollout/zero_variance_ratio": easy + hard, "rollout/easy_ratio": easy,
                "rollout/hard_ratio": hard, "rollout/response_len_mean":
                w["response_len_sum"] / w["samples"] if w["samples"] else 0.0,
                "time/generate": w["gen_seconds"], "time/weight_sync": w["sync_seconds"],
                "rollout/tokens": w["tokens"], "reward/timeouts": w["reward/timeouts"],
                "reward/errors": w["reward/errors"],
                "rollout/tokens_per_s": w["tokens"] / w["gen_seconds"] if w["gen_seconds"] else 0.0,
                "selector/skipped_easy": w["skipped_easy"], "selector/skipped_hard": w["skipped_hard"],
                "selector/p_easy": p.get(EASY, 1.0), "selector/p_hard": p.get(HARD, 1.0),
                "selector/epoch": self.cursor.epoch, **self._bias(w), **self._probe_metrics(w),
                **self.ledger.metrics()}

    @staticmethod
    def _bias(w: Counter) -> dict:
        """Mean solve rate (known at issue time) of the prompts rolled out vs trained on this step:
        how far skipping and filtering tilt training away from what the data offers.
        None while no prompt in the window has a history yet (the first epoch)."""
        def mean(key):
            return w[f"{key}_rate_sum"] / w[f"{key}_rate_n"] if w[f"{key}_rate_n"] else None
        return {"rollout/difficulty_mean": mean("rollout"), "train/difficulty_mean": mean("train")}

    def _probe_metrics(self, w: Counter) -> dict:
        """False skips over the whole run so far: probed skips whose group had a learning signal."""
        def rate(*kinds):
            n = sum(self.probes[k] for k in kinds)
            return sum(self.probes[f"false_{k}"] for k in kinds) / n if n else None
        return {"selector/false_skip_rate": rate(EASY, HARD), "selector/false_skip_rate_easy": rate(EASY),
                "selector/false_skip_rate_hard": rate(HARD), "selector/probes": self.probes[EASY] + self.probes[HARD],
                "rollout/probe_samples": w["probe_samples"]}

    def state_dict(self) -> dict:
        with self.lock:
            return {"selector": self.selector.state_dict(), "cursor": self.cursor.state_dict(),
                    "ledger": self.ledger.state_dict(), "version": self.version, "probes": dict(self.probes)}

    def load_state_dict(self, state: dict) -> None:
        with self.lock:
            self.selector.load_state_dict(state["selector"])
            self.cursor = DataCursor.from_state(state["cursor"])
            self.ledger.load_state_dict(state["ledger"])
            self.version = state["version"]
            self.probes = Counter(state.get("probes", {}))
