"""Pre-rollout prompt selection: GRESO and its baselines behind one interface.

GRESO (arXiv 2506.02177, Alg. 1): a prompt whose last `k` groups were all zero-variance
in the same direction (all correct = easy, all wrong = hard) is skipped before rollout
with probability 1 - max(p^k, 0.01), p = p_easy or p_hard. A group is easy when its mean
reward is >= 0.98 and hard when it is <= 0.11 (the authors' thresholds: with their 0.1
format score, a group of wrong-but-boxed answers is hard). After every training step
from the second epoch on (the authors' trainer gates on epoch > 0) the controller moves
p_easy / p_hard by ±0.01 (bounded to [0.05, 0.95]): down when the step's easy (hard)
ratio is >= α/3 (2α/3), up otherwise.

MoPPS (arXiv 2507.04632): a Beta(a, b) posterior over each prompt's success rate,
updated with every group's successes and failures (decaying toward the Beta(1, 1) prior
with λ); before rollout a rate is Thompson-sampled per candidate and the candidates
whose sampled rate lies nearest 0.5 are kept (or, in band mode, those inside a band).

Every selector answers three questions, and nothing else:
  keep(uid)            -> (kept?, why skipped)       before rollout
  observe(uid, rewards)                              after scoring, every group
  end_step(easy, hard, epoch=e)                      after each training step
plus `sampling_size(missing, zvr, first_round)`: the paper's sampling-round size to fill
`missing` groups (zvr: zero-variance share of the last round). The streaming sizing used
when asynchronous lives in pipeline.batching.
A selector that ranks candidates against each other (MoPPS closest mode) also answers
`rank(uids, n)` and says so with `ranked = True`.
No Ray here: the PromptSelector actor owns one of these and calls it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

EASY, HARD, MIXED = "easy", "hard", "mixed"
EASY_MEAN_MIN, HARD_MEAN_MAX = 0.98, 0.11   # the authors' group-mean thresholds (selector.*_mean_*)


def classify(rewards: Sequence[float], easy_min: float = EASY_MEAN_MIN, hard_max: float = HARD_MEAN_MAX) -> str:
    """easy: group mean >= easy_min; hard: mean <= hard_max; mixed otherwise.

    With 0/1 rewards and n = 8 this is all right / all wrong. With a format score a hard
    group may still have reward variance (0 and 0.1): dynamic sampling keeps it, GRESO's
    streak counts it as hard, as in the authors' code.
    """
    mean = float(np.mean(rewards))
    return EASY if mean >= easy_min else HARD if mean <= hard_max else MIXED


def zero_variance(rewards: Sequence[float]) -> bool:
    """Every sample got the same reward: the GRPO advantage is 0, dynamic sampling drops it."""
    return max(rewards) == min(rewards)


def skip_probability(streak: int, p: float, keep_floor: float = 0.01) -> float:
    """GRESO: skip with 1 - max(p^streak, floor); streak 0 (no zero-variance run) never skips."""
    return 1.0 - max(p ** streak, keep_floor)


def adaptive_size(missing: int, zero_variance_ratio: float, *, oversample: float = 1.25,
                  lo: int = 64, hi: int = 384) -> int:
    """The authors' later-round size: int(oversample · missing / (1 − zvr)) clamped to [lo, hi].

    zvr is the zero-variance share of the last round; at zvr = 1 the estimate is infinite
    (their code divides by zero) and the round is the cap, hi. lo > hi (a small sampling
    batch) gives hi.
    """
    if missing <= 0:
        return 0
    keep_rate = 1.0 - zero_variance_ratio
    n = hi if keep_rate <= 0 else int(oversample * missing / keep_rate)
    return max(min(lo, hi), min(n, hi))


@dataclass
class PromptHistory:
    """What GRESO remembers about one prompt: its current zero-variance streak."""

    streak_kind: str = MIXED       # EASY or HARD while a streak runs
    streak: int = 0                # consecutive most recent groups of that kind
    groups: int = 0                # groups observed in total
    solved: float = 0.0            # sum of group mean rewards (for the difficulty metrics)

    def update(self, rewards: Sequence[float], easy_min: float = EASY_MEAN_MIN,
               hard_max: float = HARD_MEAN_MAX) -> None:
        kind = classify(rewards, easy_min, hard_max)
        self.streak = self.streak + 1 if kind == self.streak_kind and kind != MIXED else int(kind != MIXED)
        self.streak_kind = kind
        self.groups += 1
        self.solved += float(np.mean(rewards))


class Selector:
    """Keep every prompt; roll out exactly what is missing; train on every group (plain GRPO)."""

    name = "none"
    post_filter = False            # drop zero-variance groups after rollout (dynamic sampling)
    ranked = False                 # chooses among a pool of candidates (rank) rather than one by one (keep)

    def __init__(self, cfg, *, batch_size: int, sampling_batch: int, seed: int = 0):
        self.cfg, self.batch_size, self.sampling_batch = cfg, batch_size, sampling_batch
        self.rng = np.random.default_rng(seed)
        self.history: dict[str, PromptHistory] = {}

    def keep(self, uid: str) -> tuple[bool, str | None]:
        return True, None

    def classify(self, rewards: Sequence[float]) -> str:
        """EASY / HARD / MIXED by the configured group-mean thresholds."""
        return classify(rewards, self.cfg.easy_mean_min, self.cfg.hard_mean_max)

    def observe(self, uid: str, rewards: Sequence[float]) -> None:
        self.history.setdefault(uid, PromptHistory()).update(rewards, self.cfg.easy_mean_min,
                                                              self.cfg.hard_mean_max)

    def end_step(self, easy_ratio: float, hard_ratio: float, *, epoch: int) -> None:
        pass

    def sampling_size(self, missing: int, zero_variance_ratio: float, *, first_round: bool = False) -> int:
        """The paper's round size; plain GRPO rolls out exactly what is missing."""
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

    def sampling_size(self, missing: int, zero_variance_ratio: float, *, first_round: bool = False) -> int:
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

    def end_step(self, easy_ratio: float, hard_ratio: float, *, epoch: int) -> None:
        """Ratio at or above its target -> explore that kind less (lower p); epoch 0 never moves p.

        The gate is the authors' (`if epoch > 0` in their trainer): in the first epoch every
        prompt is new, so the ratios say nothing yet about what skipping does.
        """
        if epoch == 0:
            return
        targets = {EASY: (easy_ratio, self.cfg.alpha / 3), HARD: (hard_ratio, 2 * self.cfg.alpha / 3)}
        for kind, (observed, target) in targets.items():
            step = -self.cfg.p_step if observed >= target else self.cfg.p_step
            self.p[kind] = min(max(self.p[kind] + step, self.cfg.p_min), self.cfg.p_max)

    def sampling_size(self, missing: int, zero_variance_ratio: float, *, first_round: bool = False) -> int:
        """The authors' rounds: the full sampling batch first, then the adaptive estimate."""
        return paper_round(self, missing, zero_variance_ratio, first_round)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "p": dict(self.p)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.p = dict(state["p"])


@dataclass
class BetaPosterior:
    """MoPPS's belief about one prompt's success rate."""

    a: float = 1.0
    b: float = 1.0

    def update(self, successes: float, failures: float, decay: float) -> None:
        """Forget toward the Beta(1, 1) prior by λ = decay, then add the new evidence."""
        self.a = decay * self.a + (1 - decay) + successes
        self.b = decay * self.b + (1 - decay) + failures


class MoPPS(DynamicSampling):
    """MoPPS: Thompson-sample each candidate's success rate from its Beta posterior.

    closest mode (the paper's): of mopps_pool x n candidates keep the n whose sampled
    rate is nearest mopps_target; band mode: keep a candidate iff its sampled rate lies
    in [mopps_band_low, mopps_band_high]. A skipped candidate is 'easy' when its sampled
    rate is above the target (band: above the band) and 'hard' otherwise. Zero-variance
    groups that still get through are dropped after rollout, and the sampling size adapts
    to the zero-variance ratio, both as for GRESO.
    """

    name = "mopps"

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.ranked = cfg.mopps_mode == "closest"
        self.posterior: dict[str, BetaPosterior] = {}

    def observe(self, uid: str, rewards: Sequence[float]) -> None:
        super().observe(uid, rewards)
        successes = float(sum(r >= 0.5 for r in rewards))
        self.posterior.setdefault(uid, BetaPosterior()).update(successes, len(rewards) - successes,
                                                               self.cfg.mopps_decay)

    def sample_rates(self, uids: Sequence[str]) -> np.ndarray:
        prior = BetaPosterior()
        post = [self.posterior.get(u, prior) for u in uids]
        return self.rng.beta([p.a for p in post], [p.b for p in post])

    def keep(self, uid: str) -> tuple[bool, str | None]:
        rate = self.sample_rates([uid])[0]
        if rate > self.cfg.mopps_band_high:
            return False, EASY
        if rate < self.cfg.mopps_band_low:
            return False, HARD
        return True, None

    def rank(self, uids: Sequence[str], n: int) -> list[str | None]:
        """For each candidate: None = kept (one of the n nearest the target), else why skipped."""
        rates = self.sample_rates(uids)
        nearest = set(np.argsort(np.abs(rates - self.cfg.mopps_target), kind="stable")[:n].tolist())
        return [None if i in nearest else (EASY if r > self.cfg.mopps_target else HARD)
                for i, r in enumerate(rates)]

    def sampling_size(self, missing: int, zero_variance_ratio: float, *, first_round: bool = False) -> int:
        return paper_round(self, missing, zero_variance_ratio, first_round)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "posterior": {u: vars(p).copy() for u, p in self.posterior.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.posterior = {u: BetaPosterior(**p) for u, p in state["posterior"].items()}


def paper_round(selector: Selector, missing: int, zvr: float, first_round: bool) -> int:
    """Sampling batch on a step's first round, else adaptive_size within [min_sampling, sampling batch]."""
    if missing <= 0:
        return 0
    if first_round:
        return selector.sampling_batch
    return adaptive_size(missing, zvr, oversample=selector.cfg.oversample, lo=selector.cfg.min_sampling,
                         hi=selector.sampling_batch)


SELECTORS = {cls.name: cls for cls in (Selector, DynamicSampling, Greso, MoPPS)}


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
    """The outcome of one selection pass: prompts to roll out and what was skipped.

    probes: (index, why) of skipped prompts rolled out anyway to measure the predictor;
    they are counted in `skipped` too and must never be trained on.
    """

    indices: list[int]
    skipped: dict[str, int]
    probes: list[tuple[int, str]] = field(default_factory=list)


def pick(selector: Selector, cursor: DataCursor, uids: Sequence[str], n: int) -> Picked:
    """Walk the cursor until `n` prompts are kept; every skip is counted by its reason.

    Probes: about probe_fraction x n of this pass's skips, drawn uniformly among them, are
    rolled out anyway. The budget follows the prompts kept, not the skips: late in
    training GRESO skips many candidates per prompt kept, and a share of skips would
    turn into a rollout bill as large as the savings (measured in bench.replay).
    The keep floor (0.01) guarantees GRESO progress, but a data set made only of long
    streaks could still take many candidates; after 100 passes over the data we stop
    skipping rather than spin.
    """
    picked, skips = Picked([], {EASY: 0, HARD: 0}), []
    if selector.ranked and n > 0:
        pool = [cursor.next() for _ in range(min(math.ceil(n * selector.cfg.mopps_pool), max(n, cursor.size)))]
        decisions = zip(pool, selector.rank([uids[i] for i in pool], n))
    else:
        decisions = _one_by_one(selector, cursor, uids, n)
    for i, why in decisions:
        if why is None:
            picked.indices.append(i)
        else:
            picked.skipped[why] += 1
            skips.append((i, why))
    probe_fraction = getattr(selector.cfg, "probe_fraction", 0.0)
    if probe_fraction and skips:
        k = min(len(skips), int(selector.rng.binomial(n, probe_fraction)))
        picked.probes = [skips[j] for j in sorted(selector.rng.choice(len(skips), k, replace=False))]
    return picked


def _one_by_one(selector: Selector, cursor: DataCursor, uids: Sequence[str], n: int):
    """(index, why) per candidate from keep(), until n are kept."""
    kept = seen = 0
    while kept < n:
        i = cursor.next()
        seen += 1
        ok, why = selector.keep(uids[i]) if seen <= 100 * cursor.size else (True, None)
        kept += ok
        yield i, why
