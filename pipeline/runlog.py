"""Reading a run directory: metrics.jsonl rows, config.yaml, and pure helpers over rows.

Shared by the HTML report (pipeline.report) and the benchmarks (bench/): rows in, plain
numbers out. Null, NaN or missing values are absent point by point, because keys such as
selector/false_skip_rate exist only for some selectors and some versions of the pipeline.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

TOTAL = "rollout/total_samples"      # cumulative samples generated: the cost axis of the GRESO paper
LEDGER_KEYS = ("ledger/issued", "ledger/trained", "ledger/filtered", "ledger/dropped_stale")
LAG_PREFIX = "staleness/groups_"     # groups trained at lag k, summed over steps (actors/learner.py)
# means over a step's rollout groups: actors/selector.py logs 0.0 for a step that rolled out nothing
GROUP_MEANS = {"reward/mean", "rollout/zero_variance_ratio", "rollout/easy_ratio", "rollout/hard_ratio",
               "rollout/response_len_mean", "rollout/tokens_per_s", "rollout/difficulty_mean"}
SMOOTH_FRACTION = 0.02               # moving-average window as a share of a series' points


def read_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl as dicts; a partial last line (run killed mid-write) is dropped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl here; pass a run directory written by run.py (run.dir)")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
            if i == len(lines):
                break
        if not isinstance(row, dict):
            raise SystemExit(f"{path}:{i}: not a JSON object; is the file corrupt?")
        rows.append(row)
    return rows


def read_config(run_dir: Path) -> dict:
    """config.yaml as a plain dict, or {} when absent or unreadable (it only names the run)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a broken config must not stop the plots
        return {}
    return cfg if isinstance(cfg, dict) else {}


def present(v) -> bool:
    """A plottable number: JSON null, NaN, strings and missing keys are absent."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(xs, ys) over the rows with both values; the step-0 eval row sits at 0 cumulative rollouts.

    A step with no rollout groups has no group means, whatever it logged: its 0.0 would read as a crash.
    """
    xs, ys = [], []
    for r in rows:
        xv = r.get(x, 0 if x == TOTAL and r.get("step") == 0 else None)
        empty = key in GROUP_MEANS and r.get("rollout/groups") == 0
        if present(xv) and present(r.get(key)) and not empty:
            xs.append(xv)
            ys.append(r[key])
    return xs, ys


def moving_average(ys: list[float], window: int) -> list[float]:
    """Centred mean over `window` points, shrinking at the ends so the curve keeps its length and level."""
    y = np.asarray(ys, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(y)])
    lo = np.clip(np.arange(len(y)) - window // 2, 0, len(y))    # point i averages y[lo:hi]
    hi = np.clip(np.arange(len(y)) - window // 2 + window, 0, len(y))
    return ((csum[hi] - csum[lo]) / np.maximum(hi - lo, 1)).tolist()


def smooth_window(n: int) -> int:
    """About 2% of the points: enough to read a trend through per-step noise, short enough to keep shifts."""
    return max(1, round(SMOOTH_FRACTION * n))


def last(rows: list[dict], key: str):
    """The key's last present value, or None."""
    return next((r[key] for r in reversed(rows) if present(r.get(key))), None)


def mean(rows: list[dict], key: str) -> float | None:
    """Mean over the rows that have the key, or None."""
    vals = series(rows, key)[1]
    return sum(vals) / len(vals) if vals else None


def eval_keys(rows: list[dict]) -> list[str]:
    """Every eval/*accuracy and eval/<set>/avg@k key: one line style each."""
    return sorted({k for r in rows for k in r
                   if k.startswith("eval/") and (k.endswith("accuracy") or "/avg@" in k)})


def lag_counts(rows: list[dict]) -> dict[int, float]:
    """Groups trained at each policy lag, summed over steps; empty for runs logged before these keys."""
    out: dict[int, float] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith(LAG_PREFIX) and k[len(LAG_PREFIX):].isdigit() and present(v):
                lag = int(k[len(LAG_PREFIX):])
                out[lag] = out.get(lag, 0) + v
    return dict(sorted(out.items()))


def summary(rows: list[dict]) -> dict[str, float | None]:
    """The table row for one run: length, final evals, cost, time and where every prompt went."""
    step_times = series(rows, "time/step")[1]
    out = {"steps": last(rows, "step")}
    out.update({f"final {k.removeprefix('eval/')}": last(rows, k) for k in eval_keys(rows)})
    out.update({"rollouts": last(rows, TOTAL), "mean s/step": mean(rows, "time/step"),
                "wall s (sum time/step)": sum(step_times) if step_times else None})
    out.update({k: last(rows, k) for k in LEDGER_KEYS})
    return out
