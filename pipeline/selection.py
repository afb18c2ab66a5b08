"""Pre-rollout prompt selection: GRESO and its baselines behind one interface.

GRESO (arXiv 2506.02177, Alg. 1): a prompt whose last `k` groups were all zero-variance
in the same direction (all correct = easy, all wrong = hard) is skipped before rollout
with probability 1 - max(p^k, 0.01), p = p_easy or p_hard. After every training step the
controller moves p_easy / p_hard by ±0.01 (bounded to [0.05, 0.95]) so that easy
zero-variance groups make up α/3 of the rolled-out groups and hard ones 2α/3.

Every selector answers three questions, and nothing else:
  keep(uid)            -> (kept?, why skipped)       before rollout
  observe(uid, rewards)                              after scoring, every group
  end_step(easy, hard)                               after each training step
plus `sampling_size(missing, zvr)`: how many prompts to roll out to fill `missing` groups.
No Ray here: the PromptSelector actor owns one of these and calls it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

EASY, HARD, MIXED = "easy", "hard", "mixed"


def classify(rewards: Sequence[float]) -> str:
    """easy: all samples right; hard: all wrong; mixed: the group has a learning signal."""
    if max(rewards) != min(rewards):
        return MIXED
    return EASY if rewards[0] >= 0.5 else HARD


def skip_probability(streak: int, p: float, keep_floor: float = 0.01) -> float:
    """GRESO: skip with 1 - max(p^streak, floor); streak 0 (no zero-variance run) never skips."""
    return 1.0 - max(p ** streak, keep_floor)


def adaptive_size(missing: int, zero_variance_ratio: float, *, oversample: float = 1.25,
                  lo: int = 1, hi: int | None = None) -> int:
    """GRESO's adaptive sampling size: ceil(k / (1 - zvr) * oversample), clamped to [lo, hi]."""
    if missing <= 0:
        return 0
    keep_rate = max(1.0 - zero_variance_ratio, 1e-2)  # zvr -> 1 would ask for infinitely many
    n = math.ceil(missing / keep_rate * oversample)
    return max(lo, min(n, hi if hi is not None else n))


@dataclass
class PromptHistory:
    """What GRESO remembers about one prompt: its current zero-variance streak."""

    streak_kind: str = MIXED       # EASY or HARD while a streak runs
    streak: int = 0                # consecutive most recent groups of that kind
    groups: int = 0                # groups observed in total
    solved: float = 0.0            # sum of group mean rewards (for the difficulty metrics)

    def update(self, rewards: Sequence[float]) -> None:
        kind = classify(rewards)
        self.streak = self.streak + 1 if kind == self.streak_kind and kind != MIXED else int(kind != MIXED)
        self.streak_kind = kind
        self.groups += 1
        self.solved += float(np.mean(rewards))


class Selector:
    """Keep every prompt; roll out exactly what is missing; train on every group (plain GRPO)."""

    name = "none"
    post_filter = False            # drop zero-variance groups after rollout (dynamic sampling)

    def __init__(self, cfg, *, batch_size: int, sampling_batch: int, seed: int = 0):
        self.cfg, self.batch_size, self.sampling_batch = cfg, batch_size, sampling_batch
        self.rng = np.random.default_rng(seed)
        self.history: dict[str, PromptHistory] = {}

    def keep(self, uid: str) -> tuple[bool, str | None]:
        return True, None

    def observe(self, uid: str, rewards: Sequence[float]) -> None:
        self.history.setdefault(uid, PromptHistory()).update(rewards)

    def end_step(self, easy_ratio: float, hard_ratio: float) -> None:
        pass

    def sampling_size(self, missing: int, zero_variance_ratio: float) -> int:
        return max(missing, 0)

    def solve_rate(self, uid: str) -> float | None:
        h = self.history.get(uid)
        return h.solved / h.groups if h and h.groups else None

    def state_dict(self) -> dict:
        return {"name": self.name, "rng": self.rng.bit_generator.state,
                "history": {u: vars(h).copy() for u, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise ValueError(f"checkpoint is for selector {state['name']!r}, not {self.name!r}")
        self.rng.bit_generator.state = state["rng"]
        self.history = {u: PromptHistory(**h) for u, h in state["history"].items()}


class DynamicSampling(Selector):
    """DAPO: roll out fixed sampling batches, drop zero-variance groups afterwards."""

    name = "dynamic_sampling"
    post_filter = True

    def sampling_size(self, missing: int, zero_variance_ratio: float) -> int:
        return self.sampling_batch if missing > 0 else 0


class Greso(DynamicSampling):
    """GRESO: probabilistic pre-rollout skipping on zero-variance streaks, self-tuning p."""

    name = "greso"

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.p = {EASY: cfg.p_easy, HARD: cfg.p_hard}

    def keep(self, uid: str) -> tuple[bool, str | None]:
        h = self.history.get(uid)
        if h is None or h.streak == 0:
            return True, None
        skip = skip_probability(h.streak, self.p[h.streak_kind], self.cfg.keep_floor)
        return (False, h.streak_kind) if self.rng.random() < skip else (True, None)

    def end_step(self, easy_ratio: float, hard_ratio: float) -> None:
        """Too many easy (hard) zero-variance groups -> explore them less, i.e. lower p."""
        targets = {EASY: (easy_ratio, self.cfg.alpha / 3), HARD: (hard_ratio, 2 * self.cfg.alpha / 3)}
        for kind, (observed, target) in targets.items():
            step = -self.cfg.p_step if observed > target else self.cfg.p_step
            self.p[kind] = min(max(self.p[kind] + step, self.cfg.p_min), self.cfg.p_max)

    def sampling_size(self, missing: int, zero_variance_ratio: float) -> int:
        return adaptive_size(missing, zero_variance_ratio, oversample=self.cfg.oversample,
                             hi=self.sampling_batch)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "p": dict(self.p)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.p = dict(state["p"])


SELECTORS = {cls.name: cls for cls in (Selector, DynamicSampling, Greso)}


def make_selector(cfg, *, batch_size: int, sampling_batch: int, seed: int = 0) -> Selector:
    """cfg: the `selector` config section."""
    return SELECTORS[cfg.name](cfg, batch_size=batch_size, sampling_batch=sampling_batch, seed=seed)


@dataclass
class DataCursor:
    """Walks the training prompts epoch by epoch, reshuffled each epoch with a seeded RNG."""

    size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0
    order: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError("no training prompts")
        if not self.order:
            self._shuffle()

    def _shuffle(self) -> None:
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist()

    def next(self) -> int:
        if self.position == self.size:
            self.epoch, self.position = self.epoch + 1, 0
            self._shuffle()
        self.position += 1
        return self.order[self.position - 1]

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    @classmethod
    def from_state(cls, state: dict) -> "DataCursor":
        return cls(**state)


@dataclass
class Picked:
    """The outcome of one selection pass: prompts to roll out and what was skipped."""

    indices: list[int]
    skipped: dict[str, int]


def pick(selector: Selector, cursor: DataCursor, uids: Sequence[str], n: int) -> Picked:
    """Walk the cursor until `n` prompts are kept; every skip is counted by its reason.

    The keep floor (0.01) guarantees progress, but a data set made only of long
    streaks could still take many candidates; after 100 passes over the data we stop
    skipping rather than spin.
    """
    kept, skipped, seen = [], {EASY: 0, HARD: 0}, 0
    while len(kept) < n:
        i = cursor.next()
        seen += 1
        ok, why = selector.keep(uids[i]) if seen <= 100 * cursor.size else (True, None)
        if ok:
            kept.append(i)
        else:
            skipped[why] += 1
    return Picked(kept, skipped)
