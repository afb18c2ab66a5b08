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
from queue import Empty, Full

import numpy as np

from pipeline.batching import Ledger, request_sizes, rollout_demand, streaming_size
from pipeline.selection import EASY, HARD, DataCursor, Picked, make_selector, pick, zero_variance
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
        self.reissue: deque[tuple[int, str | None]] = deque()  # (prompt index, probe why) of lost work
        self.restored: set[int] = set()                  # carried tickets restored from a checkpoint
        self.held: dict[int, tuple[int, ...]] = {}       # generator index -> tickets it is generating
        self.held_since: dict[int, float] = {}           # ... since when (the hang watchdog reads it)
        # paper sizing: the batch the last round filled and that round's zero-variance count
        self.round = {"batch": 0, "zv": 0, "groups": 0}
        S = cfg.pipeline.max_staleness
        self.max_in_flight = cfg.pipeline.max_in_flight or 2 * (S + 1) * cfg.rollout.sampling_batch
        self.lock = threading.Lock()
        self.wake = threading.Event()   # results or a new version came in: issue now, not at the next tick
        self.stopped = self.stop_requested = False

    # --- issuing -----------------------------------------------------------
    def zero_variance_ratio(self) -> float:
        return float(np.mean(self.recent_zv)) if self.recent_zv else 0.0

    def issue(self) -> list[Request]:
        """Pick and ticket as many prompts as the pipeline is missing; returns new requests."""
        n = self._issue_size()
        if n == 0:
            return []
        again = [self.reissue.popleft() for _ in range(min(n, len(self.reissue)))]   # lost work first
        redo = [i for i, why in again if why is None]
        picked = pick(self.selector, self.cursor, self.uids, n - len(redo)) if n > len(redo) else Picked([], {})
        picked.indices[:0] = redo
        picked.probes.extend((i, why) for i, why in again if why is not None)
        n = len(picked.indices)
        self.window.update({f"skipped_{k}": v for k, v in picked.skipped.items()})
        self.window["prompts"] += n
        self.window["issues"] += 1
        indices = picked.indices + [i for i, _ in picked.probes]
        tickets = self.ledger.issue(len(indices), indices)
        for t, i in zip(tickets, picked.indices):
            self.prior_rate[t] = self._count_rate("rollout", self.selector.solve_rate(self.uids[i]))
        for t, (_, why) in zip(tickets[n:], picked.probes):
            self.probe_why[t] = why
        probe = (False,) * n + (True,) * len(picked.probes)
        requests, start = [], 0
        for size in request_sizes(len(indices), self.cfg.rollout.request_size):
            part = slice(start, start + size)
            requests.append(Request(tuple(tickets[part]), tuple(self.prompts[j] for j in indices[part]),
                                    min_version=self.version, probe=probe[part]))
            start += size
        return requests

    def _issue_size(self) -> int:
        """How many prompts to issue now: the paper's rounds, or streaming (just in time)."""
        c, total = self.ledger.count, self.cfg.trainer.total_steps
        steps_allowed = min(total, self.version + 1 + self.cfg.pipeline.max_staleness)
        committed = c["trained"] + c["queued"] + c["carried"]
        if self.cfg.selector.sizing == "paper":
            return self._paper_round(steps_allowed, committed, c["rollout"])
        zvr = self.zero_variance_ratio()
        yield_rate = 1.0 - zvr if self.selector.post_filter else 1.0
        missing = rollout_demand(steps_allowed=steps_allowed, batch_size=self.batch_size,
                                 groups_committed=committed, prompts_in_rollout=c["rollout"], yield_rate=yield_rate)
        short_batch = committed // self.batch_size + 1      # the first batch still being filled
        return streaming_size(missing, yield_rate, request_size=self.cfg.rollout.request_size,
                              in_rollout=c["rollout"], max_in_flight=self.max_in_flight,
                              urgent=short_batch <= self.version + 2, ending=steps_allowed == total)

    def _paper_round(self, steps_allowed: int, committed: int, in_rollout: int) -> int:
        """One round at a time, as the authors' loop: the next starts when the last is scored.

        A batch's first round is the sampling batch; later ones the selector's adaptive size
        from the zero-variance share of the round before.
        """
        missing = steps_allowed * self.batch_size - committed
        if in_rollout or missing <= 0:
            return 0
        batch = committed // self.batch_size + 1
        r = self.round
        zvr = r["zv"] / r["groups"] if r["groups"] else 0.0
        n = self.selector.sampling_size(missing, zvr, first_round=batch != r["batch"])
        self.round = {"batch": batch, "zv": 0, "groups": 0}
        return n

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
        """The selector's loop (a long-running actor call); stop() ends it. It pumps on every
        report, settle and lost generator at once (a top-up that waited for the next tick cost
        the learner ~10 ms a step on tiny), and every `interval_s` to push what the queue refused."""
        while not self.stopped:
            self.wake.clear()
            self.pump()
            self.wake.wait(interval_s)

    def stop(self) -> None:
        self.stopped = True

    def pid(self) -> int:
        """The actor's process id (fault injection kills it from outside, as a crash would)."""
        import os
        return os.getpid()

    def request_stop(self) -> None:
        """A graceful stop (Ctrl-C, SIGTERM): the learner checkpoints after its current step and ends."""
        self.stop_requested = True

    # --- feedback ----------------------------------------------------------
    def report(self, results: list[dict], batches: list[tuple[list[int], list[int]]],
               gen_seconds: float = 0.0, tokens: int = 0, sync_seconds: float = 0.0,
               counts: dict | None = None) -> list[int]:
        """From the rewarder, per request: one dict per group {ticket, uid, rewards, fate,
        response_len}, then (queued, dropped-stale) tickets of each batch it cut, and its
        grading counters since the last report (reward/timeouts, reward/errors). Returns the
        tickets refused: already re-issued (their generator was given up for dead), so the
        group arrived late and must not be trained on."""
        refused = []
        with self.lock:
            for r in results:
                if self.ledger.state.get(r["ticket"]) != "rollout":
                    refused.append(r["ticket"])
                    self.window["late_groups"] += 1
                    continue
                kind = self.selector.classify(r["rewards"])
                self.selector.observe(r["uid"], r["rewards"])
                self.ledger.move([r["ticket"]], r["fate"])
                if r["fate"] == "probed":     # measured apart: no controller, ratio or sample counts
                    why = self.probe_why.pop(r["ticket"])
                    self.probes.update({why: 1, f"false_{why}": kind == "mixed"})
                    self.window["probe_samples"] += len(r["rewards"])
                    continue
                if r["fate"] == "filtered":
                    self._retire([r["ticket"]])
                zv = zero_variance(r["rewards"])
                self.recent_zv.append(zv)
                self.round["zv"] += zv
                self.round["groups"] += 1
                self.window[kind] += 1
                self.window["zero_variance"] += zv
                self.window["samples"] += len(r["rewards"])
                self.window["reward_sum"] += sum(r["rewards"])
                self.window["response_len_sum"] += r["response_len"]
            for queued, stale in batches:
                self._count_restored((), stale)
                self.ledger.move(stale, "dropped_stale")
                self.ledger.move(queued, "queued")
                self._retire(stale)
            self.window["gen_seconds"] += gen_seconds
            self.window["sync_seconds"] += sync_seconds
            self.window["tokens"] += tokens
            self.window.update(counts or {})
        self.wake.set()
        return refused

    # --- faults --------------------------------------------------------------
    def take(self, holder: int, wait_s: float = 0.0) -> Request | None:
        """Generator `holder` takes the next request, waiting up to `wait_s` for one (a polling
        generator found a top-up ~15 ms late on tiny); we note what it holds here, in the same
        call, so a generator that dies at any moment after asking has its work re-issued.

        A generator asks only once it let go of its last request (holding(())), so tickets still
        held here are a dead incarnation's: its take returned after it was counted lost."""
        if self.held.get(holder):
            self.generator_lost(holder)
        try:
            req = self.prompt_q.get(timeout=wait_s) if wait_s > 0 else self.prompt_q.get_nowait()
        except Empty:
            req = None
        self.holding(holder, req.tickets if req else ())
        return req

    def holding(self, holder: int, tickets) -> None:
        """Generator `holder` now holds these tickets (the request it generates; () when done)."""
        with self.lock:
            self.held[holder] = tuple(tickets)
            self.held_since[holder] = time.monotonic()

    def generator_lost(self, holder: int) -> int:
        """Generator `holder` died: re-issue what it held and had not delivered. Returns how many."""
        with self.lock:
            lost = [t for t in self.held.pop(holder, ()) if self.ledger.state.get(t) == "rollout"]
            self.window["reissued"] += len(lost)
            n = self.reissue_lost(lost)
        self.wake.set()
        return n

    def status(self) -> dict:
        """What the selector holds, for the hang watchdog's report."""
        with self.lock:
            return {"ledger": self.ledger.metrics(), "pending_requests": len(self.pending),
                    "reissue_queue": len(self.reissue), "held_by_generator": {k: len(v) for k, v in self.held.items()},
                    "held_since_s": {k: time.monotonic() - self.held_since[k] for k, v in self.held.items() if v},
                    "version": self.version, "zero_variance_ratio": round(self.zero_variance_ratio(), 3)}

    def settle(self, version: int, trained: list[int], stale: list[int]) -> dict:
        """From the learner after each step: ledger fates, controller update, metrics snapshot
        (with `control/stop`: whether a graceful stop was requested)."""
        with self.lock:
            self._count_restored(trained, stale)
            self.ledger.move(trained, "trained")
            self.ledger.move(stale, "dropped_stale")
            self.version = version
            self._retire(stale)
            self._retire(trained, into="train")
            w = self.window
            groups = w[EASY] + w[HARD] + w["mixed"]
            easy, hard = (w[EASY] / groups, w[HARD] / groups) if groups else (0.0, 0.0)
            if groups:   # a step that rolled nothing out says nothing about p_easy / p_hard
                self.selector.end_step(easy, hard, epoch=self.cursor.epoch)
            snapshot = self._snapshot(w, groups, easy, hard)
            self.window = Counter()
        self.wake.set()
        return snapshot

    def _count_restored(self, trained, stale) -> None:
        """Groups restored from a checkpoint that were now trained on or dropped as too old."""
        if self.restored:
            self.window["restored_trained"] += len(self.restored.intersection(trained))
            self.window["restored_stale"] += len(self.restored.intersection(stale))
            self.restored.difference_update(trained, stale)

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
                "rollout/zero_variance_ratio": w["zero_variance"] / groups if groups else 0.0,
                "rollout/easy_ratio": easy, "rollout/issues": w["issues"],
                "rollout/hard_ratio": hard, "rollout/response_len_mean":
                w["response_len_sum"] / w["samples"] if w["samples"] else 0.0,
                "time/generate": w["gen_seconds"], "time/weight_sync": w["sync_seconds"],
                "rollout/tokens": w["tokens"], "reward/timeouts": w["reward/timeouts"],
                "reward/errors": w["reward/errors"],
                "rollout/tokens_per_s": w["tokens"] / w["gen_seconds"] if w["gen_seconds"] else 0.0,
                "selector/skipped_easy": w["skipped_easy"], "selector/skipped_hard": w["skipped_hard"],
                "selector/p_easy": p.get(EASY, 1.0), "selector/p_hard": p.get(HARD, 1.0),
                "selector/epoch": self.cursor.epoch, "train/restored_groups": w["restored_trained"],
                "train/restored_stale": w["restored_stale"], "rollout/reissued": w["reissued"],
                "rollout/late_groups": w["late_groups"],
                **self._bias(w), **self._probe_metrics(w), **self.ledger.metrics(),
                "control/stop": self.stop_requested}

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
        """Everything a resume needs, as plain JSON-able values (ticket keys become strings)."""
        with self.lock:
            return {"selector": self.selector.state_dict(), "cursor": self.cursor.state_dict(),
                    "ledger": self.ledger.state_dict(), "version": self.version, "probes": dict(self.probes),
                    "window": dict(self.window), "round": dict(self.round),
                    "recent_zv": [bool(z) for z in self.recent_zv],
                    "prior_rate": dict(self.prior_rate), "probe_why": dict(self.probe_why),
                    "reissue": list(self.reissue)}

    def restore(self, state: dict) -> None:
        """Resume from a checkpoint's state: every ticket that was in rollout or queued is
        re-issued (that work is gone), carried ones wait in the rewarder as they were."""
        self.load_state_dict(state)
        with self.lock:
            self.reissue_lost(self.ledger.live("rollout", "queued"))
            self.restored = set(self.ledger.live("carried"))

    def load_state_dict(self, state: dict) -> None:
        """Exactly the state that state_dict() returned."""
        with self.lock:
            self.selector.load_state_dict(state["selector"])
            self.cursor = DataCursor.from_state(state["cursor"])
            self.ledger.load_state_dict(state["ledger"])
            self.version = state["version"]
            self.probes = Counter(state.get("probes", {}))
            self.window = Counter(state.get("window", {}))
            self.prior_rate = {int(t): r for t, r in state.get("prior_rate", {}).items()}
            self.probe_why = {int(t): w for t, w in state.get("probe_why", {}).items()}
            self.reissue = deque((i, why) for i, why in state.get("reissue", []))

            self.round = dict(state.get("round", self.round))
            self.recent_zv.clear()
            self.recent_zv.extend(state.get("recent_zv", ()))

    def reissue_lost(self, tickets: list[int]) -> int:
        """Work that will never come back (a stop, a dead actor): retire its tickets as
        `reissued` and queue their prompts to be issued again first. Returns how many."""
        whys = [self.probe_why.pop(t, None) for t in tickets]
        for t in tickets:
            self.prior_rate.pop(t, None)
        self.reissue.extend(zip(self.ledger.reissue(tickets), whys))
        return len(tickets)
