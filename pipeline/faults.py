"""Faults: the injection switch (a test aid), the generator death budget, stage failures.

    faults.kill=generator:0@step=20     SIGKILL generator 0's process after step 20
    faults.kill=learner@step=30         the Ray Train worker (rank 0) SIGKILLs itself after step 30
    faults.kill=rewarder@step=20        also: selector@step=N; several: comma-separated
    faults.stall=generator:0@step=5     generator 0 stops forever inside a request after step 5
Faults fire once, in a run's first attempt: a pipeline restarted from a checkpoint does not
kill itself again. Pure Python (no Ray).
"""
from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass

STAGES = ("generator", "rewarder", "learner", "selector")
SPEC = re.compile(r"(generator|rewarder|learner|selector)(?::(\d+))?@step=(\d+)")


class StageFailed(RuntimeError):
    """A pipeline stage died or failed; `recoverable` ones restart the pipeline from a checkpoint."""

    def __init__(self, stage: str, why: str, recoverable: bool):
        super().__init__(f"{stage}: {why}")
        self.stage, self.why, self.recoverable = stage, why, recoverable


@dataclass(frozen=True)
class Fault:
    stage: str          # generator | rewarder | learner | selector
    index: int          # which generator (0 for the others)
    step: int           # fires once this learner step has completed


def parse(spec: str) -> list[Fault]:
    """`faults.kill` / `faults.stall` -> faults; ValueError naming the bad item."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = SPEC.fullmatch(item)
        if not m:
            raise ValueError(f"{item!r}: expected STAGE[:INDEX]@step=N, STAGE one of {', '.join(STAGES)}")
        faults.append(Fault(m.group(1), int(m.group(2) or 0), int(m.group(3))))
    return faults


class DeathBudget:
    """A generator may die `max_deaths` times within `window_s` seconds; one more ends the run."""

    def __init__(self, max_deaths: int, window_s: float, clock=time.monotonic):
        self.max_deaths, self.window_s, self.clock = max_deaths, window_s, clock
        self.deaths: dict[int, deque] = {}

    def record(self, index: int) -> int:
        """Count a death of generator `index`; returns its deaths within the window, this one included."""
        now = self.clock()
        d = self.deaths.setdefault(index, deque())
        d.append(now)
        while d and now - d[0] > self.window_s:
            d.popleft()
        return len(d)

    def exhausted(self, index: int) -> bool:
        return len(self.deaths.get(index, ())) > self.max_deaths


def one_line(e: BaseException) -> str:
    """An exception's first meaningful line (Ray errors carry whole remote tracebacks)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    useful = [s for s in lines if not s.startswith(("Traceback", "File ", "^", "~"))]
    return f"{type(e).__name__}: {(useful or lines or [''])[-1][:300]}"


def stalled_stage(status: dict, queues: dict, timeout_s: float) -> str:
    """Name the stage a hung pipeline waits on, from the selector's status and the queue depths."""
    held = status.get("held_since_s", {})
    stuck = {i: s for i, s in held.items() if s >= timeout_s / 2}   # one request for half the timeout
    if stuck:
        i = max(stuck, key=stuck.get)
        return f"generator {i} (holds one request for {stuck[i]:.0f} s)"
    if queues.get("train_q", 0) >= queues.get("train_q_max", 1):
        return "learner (a full batch waits in train_q)"
    if queues.get("rollout_q", 0) >= queues.get("rollout_q_max", 1):
        return "rewarder (rollout_q is full)"
    if status.get("zero_variance_ratio", 0) >= 0.99:
        return ("rollout (every group is zero-variance: nothing to train on; check rollout.max_new_tokens, "
                "the reward and the data)")
    return "generators (requests are issued but no batch fills)"
