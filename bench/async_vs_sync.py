"""Async vs sync: the same run with pipeline.max_staleness 0, 1 and 2, side by side.

    python -m bench.async_vs_sync            # conf=tiny, 300 steps per setting, greso and dynamic_sampling
    python -m bench.async_vs_sync --steps 150 --selectors greso conf=tiny rollout.num_generators=2

max_staleness 0 is the synchronous loop: the generators may only sample for the batch
the learner will take next, so generation and training take turns. With 1 or 2 they may
run that many policy versions ahead, and filtering, rollout and training overlap.

Per setting it prints wall-clock per step (mean time/step), the learner's idle fraction
(time/wait_learner / time/step: waiting for a batch) and the generators' idle fraction
(1 - time/generate / (generators x time/step): not sampling), then each as a ratio
against max_staleness 0 of the same selector, and the stale share: prompts whose groups
were generated and then dropped as too old (ledger/dropped_stale / ledger/issued). On a 2-core CPU every actor shares the same two cores, so
overlap can only fill the cores' idle gaps; it cannot add compute the way separate
GPUs for generation and training do.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.runs import ROOT, prepare, read_rows, run_config, with_conf

STALENESS = (0, 1, 2)


def summarize(run_dir: Path, staleness: int, generators: int, wall_s: float | None = None,
              selector: str = "") -> dict:
    rows, steps = read_rows(run_dir)
    last = steps[-1]
    step_s = sum(r["time/step"] for r in steps)
    evals = [r for r in rows if "eval/accuracy" in r]
    return {"selector": selector, "max_staleness": staleness, "steps": len(steps), "step_s": step_s / len(steps),
            "learner_idle": sum(r.get("time/wait_learner", 0.0) for r in steps) / step_s,
            "generator_idle": max(0.0, 1 - sum(r.get("time/generate", 0.0) for r in steps) / (generators * step_s)),
            "staleness_mean": sum(r.get("staleness/mean", 0.0) for r in steps) / len(steps),
            "dropped_stale": last.get("ledger/dropped_stale", 0), "issued": last.get("ledger/issued", 0),
            "stale_share": last.get("ledger/dropped_stale", 0) / last["ledger/issued"]
            if last.get("ledger/issued") else 0.0, "wall_s": wall_s,
            "accuracy": evals[-1]["eval/accuracy"] if evals else None, "run_dir": str(run_dir)}


def table(rows: list[dict]) -> str:
    head = (f"{'selector':<17}{'max_staleness':>13}{'s/step':>9}{'x':>7}{'learner idle':>14}{'x':>7}"
            f"{'gen idle':>10}{'x':>7}{'lag':>6}{'stale drops':>13}{'stale share':>13}{'accuracy':>10}")
    lines = [head, "-" * len(head)]
    bases = {}
    for r in rows:
        base = bases.setdefault(r.get("selector", ""), r)   # ratios against the selector's first (sync) run
        def x(key):
            return f"x{r[key] / base[key]:.2f}" if base[key] else "-"
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        lines.append(f"{r.get('selector', ''):<17}{r['max_staleness']:>13}{r['step_s']:>9.3f}{x('step_s'):>7}"
                     f"{r['learner_idle']:>14.1%}{x('learner_idle'):>7}{r['generator_idle']:>10.1%}"
                     f"{x('generator_idle'):>7}{r['staleness_mean']:>6.2f}{r['dropped_stale']:>13,}"
                     f"{r.get('stale_share', 0.0):>13.1%}{acc:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="trainer.total_steps per setting")
    ap.add_argument("--staleness", default=",".join(map(str, STALENESS)), help="comma-separated values")
    ap.add_argument("--selectors", default="greso,dynamic_sampling", help="comma-separated selector names")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_async_vs_sync")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    overrides = with_conf(args.overrides, args.steps)
    values = [int(s) for s in args.staleness.split(",")]
    if values[0] != 0:
        values.insert(0, 0)          # ratios are against the synchronous run
    args.out.mkdir(parents=True, exist_ok=True)
    from pipeline.config import load_config
    generators = load_config(overrides).rollout.num_generators

    print("async vs sync: same config, pipeline.max_staleness in", values)
    print("overrides:", " ".join(overrides))
    prepare(overrides)
    rows = []
    for name in [x for x in args.selectors.split(",") if x]:
        for s in values:
            run_dir, wall = run_config(f"{name}_staleness{s}", args.out,
                                       [*overrides, f"selector.name={name}", f"pipeline.max_staleness={s}"])
            rows.append(summarize(run_dir, s, generators, wall, selector=name))
    print()
    print(table(rows))
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    from pipeline.report import build_report
    print(f"\nreport: {build_report([Path(r['run_dir']) for r in rows], args.out)}")


if __name__ == "__main__":
    main()
