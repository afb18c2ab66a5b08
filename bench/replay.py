"""Replay the prompt selectors at paper scale on simulated rewards: no GPU, no model, no Ray.

    python -m bench.replay                       # 17,917 prompts, B=256, 700 steps, every selector
    python -m bench.replay --steps 1000 --json runs/replay.json     # the paper's run length

This is a simulation of reward dynamics, not training. Each prompt has a solve rate that
moves as a latent policy improves; a "rollout" draws n=8 Bernoulli rewards from it. What
is real is the selection: every selector in pipeline.selection.SELECTORS (make_selector,
DataCursor, pick, keep/observe/end_step/sampling_size, skip probes) runs unchanged with
its default config, driven by the synchronous loop of actors/selector.py at
max_staleness=0 with selector.sizing=paper (the paper's setting). Per step, until B
effective groups are collected: n = sampling_size(missing, zero-variance ratio of the last
round, first_round) (the sampling batch first, then the authors' adaptive size); pick;
roll out the picked prompts and any probes; observe every group. Then end_step(easy,
hard ratio of the step's rolled-out groups, epoch) (no controller move in epoch 0). Probes are observed but kept out of the
ratios and the effective groups, as the actor does. Surplus effective groups are carried
into the next step like our Accumulator (`--discard-surplus`: dropped, as the paper's verl
loop does). `none` trains on whatever comes, so its effective groups are the mixed ones
among its B. `oracle` (bench only) sees each candidate's rewards before rollout and rolls
out only groups with a learning signal: zero waste, the physical limit.
Counted per selector: issued = candidates the cursor handed out = rolled out + skipped
(probes are skips too); rollouts = samples, n per rolled-out or probed prompt; wasted
fraction = samples in zero-variance groups (probes included) / all samples.

Latent model (RewardModel): p_i = sigmoid(θ0 + s_i·θ(P) − d_i + ε_i), θ(P) = gain·(P/1000)^shape,
P = effective groups trained so far / B: only groups with reward variance carry gradient,
so `none` improves more slowly per step than the filtering selectors (this is how one
model fits both targets below: Fig. 2a was measured under GRPO, Fig. 1's curve under
DS). d_i ~ N(0, sd); a share of prompts is never solved; s_i log-normal, mean 1; ε_i an
AR(1) noise (the fit set it to 0: Bernoulli noise plus per-prompt speeds give the churn).
Prompts and ε's path are the same for every selector (common random numbers).

Targets, Qwen2.5-Math-7B on DAPO+MATH, from the GRESO authors' repo (github.com/
Infini-AI-Lab/GRESO: docs/index.html = the project page infini-ai-lab.github.io/GRESO, and
its figure images, the paper's Fig. 1, Fig. 2a, Tables 1-2); the paper's body text was not
retrievable here, only its abstract (arXiv 2506.02177v1):
  * Fig. 2(a), GRPO, epochs 2..10: P(zero-variance now | in any earlier epoch) 0.77, 0.80,
    0.79, 0.785, then 0.79 ("~20% ... become effective prompts again"); P(zero-variance
    in an earlier epoch | now) 0.545, 0.81, 0.895, 0.93, 0.95, 0.96, 0.97, 0.98, 0.98.
  * Fig. 1 right, "GRPO w/ DS" cumulative rollouts: read 0.9/2.3/4.9/8.6/14.7/19.7M at
    steps 150/300/500/700/900/1000. Under the repo's DS loop (384-prompt rounds, surplus
    dropped, a last round once the estimate fits one) these slopes are 2.0/3.0/4.2/6.0/
    9.9/16.3 rounds a step, i.e. zero-variance ratios 0.36-0.64 (2 rounds fit that whole
    range; 0.50 used), 0.75, 0.83, 0.88, 0.93, 0.96 (DS_ZVR: derived, not printed in the paper).
  * Compared, not fitted: Table 1 rollouts DS -> GRESO on DAPO+MATH 7.6M -> 3.3M (Qwen2.5-
    Math-1.5B), 2.4M -> 1.6M (R1-Distill-Qwen-1.5B), 13.1M -> 6.3M (Qwen2.5-Math-7B); on
    OR1 3.8 -> 1.6, 2.4 -> 1.5, 11.4 -> 3.4: x0.30-x0.67. Table 2 rollout time x0.61,
    x0.67, x0.42 (the abstract's 2.4x), total training time up to 2.0x.
Fit (random search on squared error, seed 0): Fig. 2(a) within 0.03 at every epoch, DS
ratio within 0.03 in every phase up to step 900, 0.94 vs 0.96 in steps 900-1000.
Our data set is DAPO-Math-17k's 17,917 prompts (DAPO+MATH has ~25k), so an epoch of
`none` is 70 steps here, ~99 in the paper; Fig. 2(a) is compared epoch by epoch.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
from omegaconf import OmegaConf

from pipeline.config import SelectorSection
from pipeline.selection import EASY, HARD, MIXED, SELECTORS, DataCursor, Selector, classify, make_selector, pick

PAPER_TARGETS = {  # Qwen2.5-Math-7B, DAPO+MATH; see the module docstring for where each comes from
    "cur_given_prev": {2: .77, 3: .80, 4: .79, 5: .785, 6: .79, 7: .79, 8: .79, 9: .79, 10: .79},
    "prev_given_cur": {2: .545, 3: .81, 4: .895, 5: .93, 6: .95, 7: .96, 8: .97, 9: .98, 10: .98},
}
DS_ZVR = [((0, 150), .50), ((150, 300), .75), ((300, 500), .83), ((500, 700), .88), ((700, 900), .93),
          ((900, 1000), .96)]  # (paper steps, zero-variance ratio under dynamic sampling); first: 0.36-0.64
PAPER_GRESO_VS_DS = ("paper, greso vs dynamic_sampling (no probes there): rollouts x0.48 for Qwen2.5-Math-7B on "
                     "DAPO+MATH, x0.30-x0.67 over 3 models x 2 data sets; rollout time x0.42-x0.67")


@dataclass(frozen=True)
class RewardModel:
    """Prompts, batch sizes and the latent solve-rate model (fitted to the figures above)."""

    prompts: int = 17_917          # DAPO-Math-17k's size
    n: int = 8                     # samples per prompt
    batch_size: int = 256          # effective groups per training step (B)
    sampling_batch: int = 384      # prompts per round: dynamic sampling's size, GRESO's cap
    unsolvable: float = 0.047      # share of prompts never solved (wrong labels, out of reach)
    difficulty_sd: float = 1.34    # spread of the difficulty logit d_i among the others
    ability0: float = 0.19         # θ0: the policy's logit offset at step 0
    gain: float = 7.03             # θ rise over 1000 steps' worth of effective groups
    shape: float = 0.39            # θ(P) = gain * (P/1000)^shape: fast early, slower late
    speed_sd: float = 0.38         # log-normal sd of per-prompt learning speed s_i
    noise_sd: float = 0.0          # stationary sd of the logit noise ε_i (the fit chose none)
    noise_steps: float = 100.0     # ε's correlation time, in training steps

    def steps_for(self, epochs: float) -> int:
        """Training steps in which `none` (B prompts a step) sees every prompt `epochs` times."""
        return -(-epochs * self.prompts // self.batch_size)


class World:
    """Every prompt's current solve rate; a rollout is n Bernoulli draws from it."""

    def __init__(self, model: RewardModel, seed: int = 0):
        self.model = m = model
        rng = np.random.default_rng([seed, 0])                 # the prompts: the same for every selector
        self.difficulty = rng.normal(0.0, m.difficulty_sd, m.prompts)
        self.speed = rng.lognormal(-m.speed_sd ** 2 / 2, m.speed_sd, m.prompts)
        self.solvable = rng.random(m.prompts) >= m.unsolvable
        self.noise_rng = np.random.default_rng([seed, 1])      # ε's path: the same for every selector
        self.noise = self.noise_rng.normal(0.0, m.noise_sd, m.prompts)
        self.reward_rng = np.random.default_rng([seed, 2])
        self.progress = 0.0                                    # P: effective groups trained / B
        self.reserved: dict[int, list[list[float]]] = {}       # outcomes the oracle saw, rolled out next
        self._outcomes: np.ndarray | None = None               # (N, n) this step's peekable outcomes
        self._update()

    def _update(self) -> None:
        m = self.model
        ability = m.gain * (self.progress / 1000) ** m.shape
        logit = m.ability0 + self.speed * ability - self.difficulty + self.noise
        self.p = np.where(self.solvable, 1 / (1 + np.exp(-logit)), 0.0)   # (N,)

    def train_step(self, effective_groups: int) -> None:
        """The policy moves by the step's learning signal; ε takes one AR(1) step."""
        m = self.model
        self.progress += effective_groups / m.batch_size
        rho = np.exp(-1 / m.noise_steps)
        self.noise = rho * self.noise + np.sqrt(1 - rho ** 2) * m.noise_sd * self.noise_rng.standard_normal(m.prompts)
        self._outcomes = None
        self._update()

    def zero_variance_probability(self) -> np.ndarray:
        """P(all n samples agree) per prompt, at the current policy."""
        return self.p ** self.model.n + (1 - self.p) ** self.model.n

    def rollout(self, idx: np.ndarray) -> np.ndarray:
        """(k, n) rewards of 0.0/1.0; a prompt the oracle peeked at gets the outcome it saw."""
        rewards = (self.reward_rng.random((len(idx), self.model.n)) < self.p[idx, None]).astype(float)
        if self.reserved:
            for row, i in enumerate(idx.tolist()):
                if i in self.reserved:
                    rewards[row] = self.reserved[i].pop(0)
                    if not self.reserved[i]:
                        del self.reserved[i]
        return rewards

    def reserve(self, i: int, rewards: list[float]) -> None:
        """The next rollout of prompt i yields `rewards` (a prompt can be picked twice in one pass)."""
        self.reserved.setdefault(i, []).append(rewards)

    def peek(self, i: int) -> list[float]:
        """Prompt i's rewards if rolled out now. Drawn for all prompts at once per step (one numpy
        call instead of one per candidate); a prompt met twice in a step gets a fresh draw."""
        if self._outcomes is None:
            self._outcomes = self.reward_rng.random((self.model.prompts, self.model.n)) < self.p[:, None]
            self._seen = np.zeros(self.model.prompts, dtype=bool)
        if self._seen[i]:
            return (self.reward_rng.random(self.model.n) < self.p[i]).astype(float).tolist()
        self._seen[i] = True
        return self._outcomes[i].astype(float).tolist()


class Oracle(Selector):
    """Knows each candidate's rewards before rollout and rolls out only mixed groups."""

    name = "oracle"
    post_filter = True

    def __init__(self, cfg, *, world: World, **kw):
        super().__init__(cfg, **kw)
        self.world = world

    def keep(self, uid: str) -> tuple[bool, str | None]:
        rewards = self.world.peek(int(uid))
        kind = classify(rewards)
        if kind != MIXED:
            return False, kind
        self.world.reserve(int(uid), rewards)
        return True, None

    def observe(self, uid: str, rewards) -> None:
        pass                                  # needs no history: it sees the future


def build_selector(name: str, model: RewardModel, seed: int, world: World) -> Selector:
    """The real selector from a default config section (the oracle: the bench's own)."""
    no_probes = {"probe_fraction": 0.0} if name == "oracle" else {}   # the limit wastes nothing, not even probes
    section = OmegaConf.structured(SelectorSection(name=name, **no_probes))
    # The same values as a plain dataclass: OmegaConf attribute reads cost microseconds, and
    # GRESO reads its config once per candidate, millions of times here.
    cfg = OmegaConf.to_object(section)
    kw = dict(batch_size=model.batch_size, sampling_batch=model.sampling_batch, seed=seed)
    return Oracle(cfg, world=world, **kw) if name == "oracle" else make_selector(cfg, **kw)


class _Run:
    """One selector's replay: the synchronous loop of actors/selector.py and its counters."""

    def __init__(self, model: RewardModel, name: str, seed: int, carry: bool, trace: dict | None):
        self.m, self.carry, self.trace = model, carry, trace
        self.world = World(model, seed)
        self.selector = build_selector(name, model, seed, self.world)
        self.cursor = DataCursor(model.prompts, seed=seed)
        self.uids = [str(i) for i in range(model.prompts)]
        self.last_zvr = 0.0                   # zero-variance share of the last round (paper sizing)
        self.c: Counter = Counter()
        self.carried = 0

    def step(self) -> None:
        """Collect B effective groups (or B groups for `none`), then settle the step."""
        B, window = self.m.batch_size, Counter()
        collected, first = self.carried, True
        while collected < B:
            n = self.selector.sampling_size(B - collected, self.last_zvr, first_round=first)
            if n <= 0:
                raise RuntimeError(f"{self.selector.name}: sampling_size({B - collected}, {self.last_zvr:.2f}) = {n}")
            collected, first = collected + self._round(n, window), False
        post = self.selector.post_filter
        effective = B if post else window[MIXED]
        self.carried = collected - B if post and self.carry else 0
        self.c["effective"] += effective
        self.c["steps"] += 1
        groups = window[EASY] + window[HARD] + window[MIXED]
        self.selector.end_step(window[EASY] / groups if groups else 0.0, window[HARD] / groups if groups else 0.0,
                               epoch=self.cursor.epoch)
        self.world.train_step(effective)
        if self.trace is not None:
            self.trace.setdefault("zvr", []).append(1 - window[MIXED] / groups if groups else float("nan"))

    def _round(self, n: int, window: Counter) -> int:
        """Pick n prompts, roll them (and any probes) out; returns the groups it adds to the batch."""
        start = self._position()
        picked = pick(self.selector, self.cursor, self.uids, n)
        self.c["issued"] += self._position() - start
        self.c["skipped"] += sum(picked.skipped.values())
        mixed = self._roll(picked.indices, window)
        probes = [i for i, _ in getattr(picked, "probes", ())]
        if probes:
            self._roll(probes, None)
        if self.trace is not None and not sum(picked.skipped.values()):
            self._record_epochs(start, picked.indices, mixed)
        return int(mixed.sum()) if self.selector.post_filter else len(picked.indices)

    def _roll(self, indices: list[int], window: Counter | None) -> np.ndarray:
        """Roll out and observe every group; window None = probes (counted apart). Returns mixed mask."""
        rewards = self.world.rollout(np.asarray(indices, dtype=np.int64))        # (k, n)
        for i, r in zip(indices, rewards.tolist()):
            self.selector.observe(self.uids[i], r)
        solved = rewards.sum(axis=1)
        mixed = (solved > 0) & (solved < self.m.n)
        zero_var = int((~mixed).sum())
        self.c["samples"] += rewards.size
        self.c["wasted_samples"] += zero_var * self.m.n
        if window is None:
            self.c["probes"] += len(indices)
            self.c["probe_samples"] += rewards.size
            return mixed
        self.c["rolled_out"] += len(indices)
        window.update({EASY: int((solved == self.m.n).sum()), HARD: int((solved == 0).sum()),
                       MIXED: len(indices) - zero_var})
        self.last_zvr = zero_var / len(indices) if len(indices) else 0.0
        return mixed

    def _position(self) -> int:
        return self.cursor.epoch * self.cursor.size + self.cursor.position

    def _record_epochs(self, start: int, indices: list[int], mixed: np.ndarray) -> None:
        """Zero-variance outcome per (epoch, prompt), for the temporal-consistency check."""
        epochs = (start + np.arange(len(indices))) // self.m.prompts
        table = self.trace.setdefault("zv_by_epoch", {})
        for e in np.unique(epochs).tolist():
            row = table.setdefault(e, np.full(self.m.prompts, -1, dtype=np.int8))
            sel = epochs == e
            row[np.asarray(indices)[sel]] = ~mixed[sel]

    def row(self, name: str) -> dict:
        c = self.c
        return {"selector": name, "steps": c["steps"], "issued": c["issued"], "skipped": c["skipped"],
                "rolled_out": c["rolled_out"], "probes": c["probes"], "samples": c["samples"],
                "probe_samples": c["probe_samples"], "effective_groups": c["effective"],
                "rollouts_per_effective": c["samples"] / c["effective"] if c["effective"] else float("inf"),
                "wasted_fraction": c["wasted_samples"] / c["samples"] if c["samples"] else 0.0}


def replay(selector_name: str, model: RewardModel = RewardModel(), steps: int | None = None, seed: int = 0,
           *, carry: bool = True, trace: dict | None = None) -> dict:
    """One selector through `steps` synchronous training steps; returns its table row.

    steps None: 10 epochs' worth for `none` (Fig. 2a's span). trace, if given, is filled with
    the per-step zero-variance ratio ("zvr") and, for a selector that never skips, the
    zero-variance outcome per (epoch, prompt) ("zv_by_epoch").
    """
    run = _Run(model, selector_name, seed, carry, trace)
    for _ in range(model.steps_for(10) if steps is None else steps):
        run.step()
    return run.row(selector_name)


def consistency(zv_by_epoch: dict[int, np.ndarray]) -> dict[str, dict[int, float]]:
    """Fig. 2(a)'s probabilities per complete epoch (numbered from 1), plus the one-step one."""
    epochs = sorted(e for e, row in zv_by_epoch.items() if (row >= 0).all())
    out = {"cur_given_prev": {}, "prev_given_cur": {}, "next_given_now": {}}
    ever = np.zeros(len(zv_by_epoch[epochs[0]]), dtype=bool) if epochs else None
    for k, e in enumerate(epochs):
        now = zv_by_epoch[e] == 1
        if k:
            out["cur_given_prev"][e + 1] = float(now[ever].mean())
            out["prev_given_cur"][e + 1] = float(ever[now].mean())
            last = zv_by_epoch[epochs[k - 1]] == 1
            out["next_given_now"][e + 1] = float(now[last].mean())
        ever |= now
    return out


def ds_phases(zvr: list[float]) -> list[tuple[str, float, float]]:
    """(paper steps, simulated, paper) zero-variance ratio under dynamic sampling, per phase the run covers."""
    return [(f"{a}-{b}", float(np.nanmean(zvr[a:b])), target) for (a, b), target in DS_ZVR if b <= len(zvr)]


def selector_names() -> list[str]:
    """Every selector the pipeline has, in its own order, then the bench's oracle."""
    return [*SELECTORS, "oracle"]


COLUMNS = [  # (row key, header, width, format)
    ("selector", "selector", 17, "{}"), ("steps", "steps", 6, "{}"), ("issued", "issued", 11, "{:,}"),
    ("skipped", "skipped", 11, "{:,}"), ("samples", "rollouts", 12, "{:,}"),
    ("probe_samples", "probe rollouts", 15, "{:,}"), ("effective_groups", "effective grps", 15, "{:,}"),
    ("rollouts_per_effective", "rollouts/eff grp", 17, "{:.2f}"), ("wasted_fraction", "wasted frac", 12, "{:.3f}")]


def print_table(rows: list[dict]) -> None:
    """One row per selector, then each selector's rollouts relative to dynamic sampling."""
    print("".join(f"{head:<{w}}" if k == "selector" else f"{head:>{w}}" for k, head, w, _ in COLUMNS))
    for r in rows:
        print("".join(f"{fmt.format(r[k]):<{w}}" if k == "selector" else f"{fmt.format(r[k]):>{w}}"
                      for k, _, w, fmt in COLUMNS))
    base = next((r for r in rows if r["selector"] == "dynamic_sampling"), None)
    for r in rows:
        if base and r["selector"] == "none":   # trains B groups a step, of which only the mixed carry signal
            print(f"none vs dynamic_sampling: rollouts x{r['samples'] / base['samples']:.2f}, rollouts per effective "
                  f"group x{r['rollouts_per_effective'] / base['rollouts_per_effective']:.2f} "
                  f"({r['effective_groups'] / base['effective_groups']:.2f} of the effective groups)")
        if base and r["selector"] not in ("none", "dynamic_sampling"):
            probes = (f" (x{(r['samples'] - r['probe_samples']) / base['samples']:.2f} without its probe rollouts)"
                      if r["probe_samples"] else "")
            print(f"{r['selector']} vs dynamic_sampling: rollouts x{r['samples'] / base['samples']:.2f}{probes}")
    if base:
        print(PAPER_GRESO_VS_DS)


def print_calibration(cal: dict) -> None:
    """Simulated vs paper figures, line under line."""
    def line(label: str, tag: str, values, fmt: str = "{:>8.2f}") -> None:
        print(f"  {label:<46}{tag:<6}" + "".join(fmt.format(v) for v in values))

    print("\ncalibration against the GRESO paper (Qwen2.5-Math-7B, DAPO+MATH; sources in bench/replay.py):")
    tc = cal["consistency"]
    epochs = [e for e in sorted(PAPER_TARGETS["cur_given_prev"]) if e in tc["cur_given_prev"]]
    line("under none (GRPO), Fig. 2(a)", "epoch", epochs, "{:>8}")
    for key, label in [("cur_given_prev", "P(zv now | zv in an earlier epoch)"),
                       ("prev_given_cur", "P(zv in an earlier epoch | zv now)")]:
        line(label, "sim", [tc[key][e] for e in epochs])
        line("", "paper", [PAPER_TARGETS[key][e] for e in epochs])
    line("P(zv at e+1 | zv at e), not in the paper", "sim", [tc["next_given_now"][e] for e in epochs])
    line("zero-variance ratio under none", "tenth", ["first", "middle", "last"], "{:>8}")
    line("", "sim", cal["none_zvr"])
    line("", "paper", ["n/a"] * 3, "{:>8}")
    phases = cal["ds_zvr"]
    line("zero-variance ratio under dynamic_sampling", "steps", [p for p, _, _ in phases], "{:>9}")
    line("", "sim", [s for _, s, _ in phases], "{:>9.2f}")
    line("(Fig. 1 DS curve; first: 0.36-0.64)", "paper", [t for _, _, t in phases], "{:>9.2f}")


def calibrate(none_trace: dict, ds_trace: dict) -> dict:
    """The fit check: Fig. 2(a) under none, none's zero-variance ratio, DS's per phase of Fig. 1."""
    zvr, tenth = none_trace["zvr"], max(len(none_trace["zvr"]) // 10, 1)
    mid = (len(zvr) - tenth) // 2
    return {"consistency": consistency(none_trace.get("zv_by_epoch", {})),
            "none_zvr": [float(np.nanmean(z)) for z in (zvr[:tenth], zvr[mid:mid + tenth], zvr[-tenth:])],
            "ds_zvr": ds_phases(ds_trace["zvr"])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per selector; default: 10 epochs for none (700 at 17,917 prompts, "
                         "Fig. 2a's span); the paper ran 1000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=RewardModel.prompts, help="training prompts (DAPO-Math-17k: 17,917)")
    ap.add_argument("--discard-surplus", action="store_true", help="drop effective groups beyond B (paper's verl loop)")
    ap.add_argument("--json", metavar="PATH", help="also write the table and calibration here")
    args = ap.parse_args(argv)
    model = replace(RewardModel(), prompts=args.prompts)
    args.steps = model.steps_for(10) if args.steps is None else args.steps
    print("SIMULATION of reward dynamics, not training: simulated solve rates, Bernoulli rewards,")
    print("the real pipeline.selection selectors. No model is trained and no text is generated.")
    print(f"{model.prompts:,} prompts, n={model.n}, B={model.batch_size}, sampling batch {model.sampling_batch}, "
          f"{args.steps} steps, seed {args.seed}, surplus {'discarded' if args.discard_surplus else 'carried'}\n")
    rows, traces, seconds = [], {}, {}
    for name in selector_names():
        t0, traces[name] = time.perf_counter(), {}
        rows.append(replay(name, model, args.steps, args.seed, carry=not args.discard_surplus, trace=traces[name]))
        seconds[name] = time.perf_counter() - t0
    print_table(rows)
    cal = calibrate(traces["none"], traces["dynamic_sampling"])
    print_calibration(cal)
    print("\nseconds per selector: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    out = {"model": asdict(model), "steps": args.steps, "seed": args.seed, "carry": not args.discard_surplus,
           "rows": rows, "calibration": {**cal, "consistency": {k: {str(e): v for e, v in d.items()}
                                                               for k, d in cal["consistency"].items()}}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
