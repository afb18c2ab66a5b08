"""Rollout efficiency: the same run once per selector, side by side, in one table.

    python -m bench.rollout_efficiency --quick          # ~12 min on a 2-core CPU (conf=tiny)
    python -m bench.rollout_efficiency                  # conf=tiny's full 1000 steps per selector
    python -m bench.rollout_efficiency conf=qwen1.5b    # any config; key=value overrides pass through

Every run has the same config and seed; only selector.name differs. --quick runs 400
steps from a stronger tiny base (data.tiny.warm_target=0.8 instead of 0.3): the GRESO
paper's runs start where a large share of the training prompts is already solved
(about half the groups zero-variance), a regime conf=tiny's 0.3 base only reaches after
~700 steps; 400 steps from 0.3 show the early regime, where there is little to skip. Runs are sequential
subprocesses of run.py (each with its own Ray), so they never compete for the CPUs. The
table reads each run's metrics.jsonl:

  rollouts       samples generated for training (kept, filtered or dropped stale); probe
                 samples (rolled out only to measure the skip predictor) in their own column
  per group      rollouts / groups trained on that had a learning signal
  wasted         share of rollouts in zero-variance groups
  stale          share of issued prompts dropped because their groups grew too old
  idle           the learner's idle share: time/wait_learner / time/step
  gen s          generator-seconds spent sampling (time/generate summed)
  wall s         the run.py process, start to exit (includes Ray start and evaluation)
  accuracy       final held-out accuracy (eval/accuracy)

then, per target held-out accuracy (--targets, default 0.85 and 0.90), the rollouts and the
training-loop seconds (time/step summed) spent until the first evaluation at or above it
("-" if never reached): fixed step counts favour whoever learns less per step, a target does
not (plain GRPO may need fewer rollouts to reach it). Then ratio lines against dynamic
sampling (DAPO), the baseline GRESO is measured against, and one HTML report over all runs
(pipeline.report).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.runs import ROOT, prepare, read_rows, run_config, with_conf
from pipeline.runlog import read_config

SELECTORS = ("none", "dynamic_sampling", "greso", "mopps")
TARGETS = (0.85, 0.90)
QUICK_STEPS = 400
QUICK_TINY = ["data.tiny.warm_target=0.8"]     # start in the paper's regime (see the docstring)


def to_target(rows: list[dict], target: float) -> dict | None:
    """Rollouts and training-loop seconds until the first evaluation at >= target (None: never)."""
    samples = seconds = 0.0
    for r in rows:
        samples += r.get("rollout/samples", 0) + r.get("rollout/probe_samples", 0)
        seconds += r.get("time/step", 0.0)
        if r.get("eval/accuracy") is not None and r["eval/accuracy"] >= target:
            return {"step": r.get("step", 0), "rollouts": int(samples), "seconds": seconds}
    return None


def summarize(run_dir: Path, wall_s: float | None = None, targets=TARGETS) -> dict:
    """One table row from a finished run's metrics.jsonl."""
    rows, steps = read_rows(run_dir)
    samples = sum(r.get("rollout/samples", 0) for r in steps)
    groups = sum(r.get("rollout/groups", 0) for r in steps)
    zero_var = sum(r.get("rollout/zero_variance_ratio", 0) * r.get("rollout/groups", 0) for r in steps)
    signal = sum(r.get("train/signal_groups", r.get("train/effective_groups", 0)) for r in steps)
    ledger = steps[-1]
    evals = [r for r in rows if "eval/accuracy" in r]
    return {"selector": _selector_name(run_dir), "steps": len(steps), "rollouts": samples,
            "probe_rollouts": sum(r.get("rollout/probe_samples", 0) for r in steps),
            "per_group": samples / signal if signal else float("inf"),
            "wasted": zero_var / groups if groups else 0.0,
            "stale": ledger.get("ledger/dropped_stale", 0) / ledger["ledger/issued"]
            if ledger.get("ledger/issued") else 0.0,
            "learner_idle": sum(r.get("time/wait_learner", 0.0) for r in steps)
            / max(sum(r.get("time/step", 0.0) for r in steps), 1e-9),
            "to_target": {str(t): to_target(rows, t) for t in targets},
            "gen_s": sum(r.get("time/generate", 0.0) for r in steps),
            "train_loop_s": sum(r.get("time/step", 0.0) for r in steps),
            "wall_s": wall_s, "accuracy": evals[-1]["eval/accuracy"] if evals else None,
            "initial_accuracy": evals[0]["eval/accuracy"] if evals else None,
            "false_skip_rate": ledger.get("selector/false_skip_rate"), "run_dir": str(run_dir)}


def _selector_name(run_dir: Path) -> str:
    return (read_config(run_dir).get("selector") or {}).get("name") or run_dir.name


def table(rows: list[dict]) -> str:
    head = (f"{'selector':<17}{'steps':>6}{'rollouts':>10}{'probe':>7}{'per group':>10}{'wasted':>8}"
            f"{'stale':>7}{'idle':>7}{'gen s':>8}{'wall s':>8}{'accuracy':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "-"
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        lines.append(f"{r['selector']:<17}{r['steps']:>6}{r['rollouts']:>10,}{r['probe_rollouts']:>7,}"
                     f"{r['per_group']:>10.2f}{r['wasted']:>8.1%}{r['stale']:>7.1%}"
                     f"{r.get('learner_idle', 0.0):>7.1%}{r['gen_s']:>8.0f}{wall:>8}{acc:>9}")
    return "\n".join(lines)


def target_table(rows: list[dict]) -> str:
    """Rollouts (with probes) and training-loop seconds to reach each target accuracy."""
    targets = list(rows[0].get("to_target", {})) if rows else []
    head = f"{'selector':<17}" + "".join(f"{'to ' + t:>26}" for t in targets)
    lines = [head, f"{'':<17}" + f"{'step  rollouts  loop s':>26}" * len(targets), "-" * len(head)]
    for r in rows:
        cells = []
        for t in targets:
            hit = r["to_target"][t]
            cells.append(f"{hit['step']:>9}{hit['rollouts']:>10,}{hit['seconds']:>7.0f}" if hit else f"{'-':>26}")
        lines.append(f"{r['selector']:<17}" + "".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


def ratios(rows: list[dict], baseline: str = "dynamic_sampling") -> list[str]:
    """`greso vs dynamic_sampling: rollouts x0.NN, generation time x0.NN, accuracy +N.N pts`."""
    by = {r["selector"]: r for r in rows}
    base = by.get(baseline)
    if base is None:
        return []
    out = []
    for r in rows:
        if r["selector"] == baseline:
            continue
        parts = [f"rollouts x{r['rollouts'] / base['rollouts']:.2f}"
                 + (f" (x{(r['rollouts'] + r['probe_rollouts']) / base['rollouts']:.2f} with probes)"
                    if r["probe_rollouts"] else ""),
                 f"generation time x{r['gen_s'] / base['gen_s']:.2f}"]
        if r["wall_s"] and base["wall_s"]:
            parts.append(f"wall-clock x{r['wall_s'] / base['wall_s']:.2f}")
        if r["accuracy"] is not None and base["accuracy"] is not None:
            parts.append(f"accuracy {100 * (r['accuracy'] - base['accuracy']):+.1f} pts")
        out.append(f"{r['selector']} vs {baseline}: " + ", ".join(parts))
    return out


def run_one(selector: str, out: Path, overrides: list[str], targets=TARGETS) -> dict:
    run_dir, wall = run_config(selector, out, [*overrides, f"selector.name={selector}"])
    row = summarize(run_dir, wall, targets)
    print(f"[{time.strftime('%H:%M:%S')}] {selector}: {row['steps']} steps in {wall:.0f} s, "
          f"{row['rollouts']:,} rollouts, accuracy {row['accuracy']:.3f}", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_STEPS} steps per selector from a 0.8 tiny base (~12 min on 2 CPUs)")
    ap.add_argument("--steps", type=int, help="trainer.total_steps per run (default: the config's)")
    ap.add_argument("--selectors", default=",".join(SELECTORS), help="comma-separated selector names")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_rollout_efficiency")
    ap.add_argument("--summarize", action="store_true", help="only re-read finished runs under --out")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="held-out accuracies to reach")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. conf=tiny seed=1")
    args = ap.parse_args(argv)
    overrides = with_conf(args.overrides, args.steps or (QUICK_STEPS if args.quick else None))
    if args.quick and "conf=tiny" in overrides and not any(o.startswith("data.tiny.warm_target=") for o in overrides):
        overrides[1:1] = QUICK_TINY
    selectors = [s for s in args.selectors.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)

    print("rollout efficiency: same config and seed, one run per selector:", ", ".join(selectors))
    print("overrides:", " ".join(overrides))
    targets = [float(t) for t in args.targets.split(",") if t]
    if args.summarize:
        rows = [summarize(args.out / s, targets=targets) for s in selectors
                if (args.out / s / "metrics.jsonl").exists()]
    else:
        prepare(overrides)
        rows = [run_one(s, args.out, overrides, targets) for s in selectors]
    print()
    print(table(rows))
    print()
    print(target_table(rows))
    print()
    for line in ratios(rows):
        print(line)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    try:
        from pipeline.report import build_report
        html = build_report([Path(r["run_dir"]) for r in rows], args.out)
        print(f"\nreport: {html}")
    except ImportError as e:
        print(f"\n(no report: {e})")


if __name__ == "__main__":
    main()
