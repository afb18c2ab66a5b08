"""Run report: overlay several runs' metrics.jsonl as PNG plots on one offline HTML page.

    python -m pipeline.report runs/none runs/greso --out runs/compare   # runs/compare/report.html
    python -m pipeline.report runs/greso                                # runs/greso/report.html

The page is plain HTML with <img src="report_*.png"> beside it: no JS, no CDN, so it opens
from a cluster's disk, a laptop or a headless browser. Each run keeps one colour in every
plot. Data helpers are pure (rows in, lists out); each plot is a function from runs to a
matplotlib Figure, or None when no run has its keys, and the page then says so instead of
showing empty axes. Null, NaN or missing values are skipped point by point: keys such as
selector/false_skip_rate exist only for some selectors and some versions of the pipeline.
Figures are built without pyplot, so importing this module changes no global backend.
Reading the run directories is pipeline.runlog's job.
"""
from __future__ import annotations

import argparse
import html
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline.runlog import (TOTAL, eval_keys, lag_counts, mean, moving_average, present, read_config, read_rows,
                             series, smooth_window, summary)

TIME_KEYS = ("time/generate", "time/train", "time/wait_learner", "time/weight_publish")
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
TIME_COLOURS = ("#8dd3c7", "#bebada", "#fb8072", "#80b1d3")


@dataclass(frozen=True)
class Run:
    """One run directory: its legend label and metric rows (one dict per line of metrics.jsonl)."""
    dir: Path
    label: str
    rows: list[dict]


def run_labels(dirs: list[Path], configs: list[dict]) -> list[str]:
    """'<run.name> · <selector.name>' from config.yaml; dir names where those are missing or clash (seeds)."""
    def named(d: Path, c: dict) -> str:
        name, sel = (c.get("run") or {}).get("name"), (c.get("selector") or {}).get("name")
        if name and sel:
            return name if name == sel else f"{name} · {sel}"
        return d.name
    labels = [named(d, c) for d, c in zip(dirs, configs)]
    for fallback in (lambda d: d.name, str):
        if len(set(labels)) < len(labels):
            labels = [fallback(d) for d in dirs]
    return labels


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """Every run's rows and label; fails on the first directory without metrics.jsonl."""
    dirs = [Path(d) for d in run_dirs]
    rows = [read_rows(d) for d in dirs]
    labels = run_labels(dirs, [read_config(d) for d in dirs])
    return [Run(d, lab, r) for d, lab, r in zip(dirs, labels, rows)]


# ---- plots: runs -> Figure or None -----------------------------------------------------------

class Panel(NamedTuple):
    """One axis: `keys` as (metric key, line style) pairs against the `x` key."""
    keys: list[tuple[str, str]]
    ylabel: str
    x: str = "step"
    xlabel: str = "step"
    smooth: bool = False


def _axes(ncols: int = 1, width: float = 6.5):
    fig = Figure(figsize=(width * ncols, 4.2), dpi=100, layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _draw(ax, runs: list[Run], p: Panel, *, faint_raw: bool, marker: bool) -> tuple[set[int], set[str]]:
    """Each key of every run vs p.x, run i in colour Ci; returns the runs and keys that had points.

    One smoothing window for all runs (2% of the longest), so runs of different lengths compare fairly.
    """
    window = smooth_window(max(len(r.rows) for r in runs))
    drew, keys = set(), set()
    for i, run in enumerate(runs):
        for j, (key, style) in enumerate(p.keys):
            xs, ys = series(run.rows, key, p.x)
            if not xs:
                continue
            drew.add(i)
            keys.add(key)
            if p.smooth and faint_raw:
                ax.plot(xs, ys, color=f"C{i}", alpha=0.18, lw=0.7)
            ax.plot(xs, moving_average(ys, window) if p.smooth else ys, style, color=f"C{i}", lw=1.4,
                    marker=MARKERS[j % len(MARKERS)] if marker else None, ms=3.5)
    return drew, keys


def _legend(ax, runs: list[Run], drew: set[int], keys, drawn_keys: set[str], marker: bool) -> None:
    """Colour = run, line style (and marker) = key: two short lists instead of runs x keys entries."""
    handles = [Line2D([], [], color=f"C{i}", label=runs[i].label) for i in sorted(drew)]
    if len(drawn_keys) > 1:
        handles += [Line2D([], [], ls=s, color="0.3", marker=MARKERS[j % len(MARKERS)] if marker else None,
                           label=key) for j, (key, s) in enumerate(keys) if key in drawn_keys]
    ax.legend(handles=handles, fontsize=8)


def line_figure(runs: list[Run], panels: list[Panel], *, width: float = 6.5, faint_raw: bool = False,
                marker: bool = False) -> Figure | None:
    """One axis per panel, every run overlaid; None when no run has any of the keys."""
    fig, axes = _axes(len(panels), width)
    drew_any = False
    for ax, p in zip(axes, panels):
        drew, drawn_keys = _draw(ax, runs, p, faint_raw=faint_raw, marker=marker)
        ax.set(xlabel=p.xlabel, ylabel=p.ylabel + (" (smoothed)" if p.smooth else ""))
        ax.grid(alpha=0.3)
        if drew:
            _legend(ax, runs, drew, p.keys, drawn_keys, marker)
        drew_any |= bool(drew)
    return fig if drew_any else None


def plot_reward(runs):
    keys = [("reward/mean", "-")]
    return line_figure(runs, [Panel(keys, "reward/mean", smooth=True),
                              Panel(keys, "reward/mean", TOTAL, "cumulative rollouts", smooth=True)],
                       faint_raw=True)


def plot_eval(runs):
    names = sorted({k for r in runs for k in eval_keys(r.rows)})
    if any(k.count("/") == 2 for k in names):   # eval/accuracy repeats the first named set: draw it once
        names = [k for k in names if k != "eval/accuracy"]
    keys = [(k, STYLES[j % len(STYLES)]) for j, k in enumerate(names)]
    return line_figure(runs, [Panel(keys, "eval accuracy"),
                              Panel(keys, "eval accuracy", TOTAL, "cumulative rollouts")], marker=True)


def plot_zero_variance(runs):
    keys = [("rollout/easy_ratio", "-"), ("rollout/hard_ratio", "--")]
    return line_figure(runs, [Panel(keys, "share of groups: all correct / all wrong", smooth=True)], width=10)


def plot_selector(runs):
    return line_figure(runs, [
        Panel([("selector/skipped_easy", "-"), ("selector/skipped_hard", "--")], "prompts skipped per step",
              smooth=True),
        Panel([("selector/p_easy", "-"), ("selector/p_hard", "--")], "exploration probability p")])


def plot_rollouts(runs):
    keys = [("rollout/samples", "-"), ("rollout/probe_samples", "--")]
    return line_figure(runs, [Panel(keys, "rollouts per step", smooth=True)], width=10)


def plot_time(runs):
    means = [[mean(r.rows, k) or 0.0 for k in TIME_KEYS] for r in runs]
    if not any(map(any, means)):
        return None
    fig, (ax,) = _axes(1, max(6.0, 1.6 * len(runs) + 4))
    x, bottom = np.arange(len(runs)), np.zeros(len(runs))
    for j, key in enumerate(TIME_KEYS):   # pastel parts, so they never read as a run's colour
        vals = np.array([m[j] for m in means])
        ax.bar(x, vals, 0.6, bottom=bottom, label=key, color=TIME_COLOURS[j], ec="0.4", lw=0.5)
        bottom += vals
    wall = [(xi, s) for xi, r in zip(x, runs) if (s := mean(r.rows, "time/step")) is not None]
    if wall:
        ax.scatter(*zip(*wall), marker="_", s=1200, color="black", lw=2.5, zorder=3, label="time/step (wall)")
    ax.set_xticks(x, [r.label for r in runs], rotation=15 if len(runs) > 3 else 0)
    ax.set_ylabel("mean seconds per step")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), markerscale=0.4)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_staleness(runs):
    counts = [lag_counts(r.rows) for r in runs]
    fig, (ax,) = _axes(1, 10)
    if any(counts):   # exact: groups per lag from staleness/groups_<k>
        lags = sorted({k for c in counts for k in c})
        have = [(i, c) for i, c in enumerate(counts) if c]
        width = 0.8 / len(have)
        for n, (i, c) in enumerate(have):
            total = sum(c.values())
            ax.bar([lag + (n - (len(have) - 1) / 2) * width for lag in lags],
                   [c.get(lag, 0) / total for lag in lags], width, color=f"C{i}", label=runs[i].label)
        ax.set(xticks=lags, xlabel="policy lag of trained groups (versions)", ylabel="share of trained groups")
        if len(have) < len(runs):
            ax.set_title("runs logged without staleness/groups_<k> are not shown", fontsize=9)
    else:             # runs logged before those keys: how the per-step mean lag was spread
        vals = [series(r.rows, "staleness/mean")[1] for r in runs]
        have = [i for i, v in enumerate(vals) if v]
        if not have:
            return None
        ax.hist([vals[i] for i in have], bins=np.histogram_bin_edges(np.concatenate([vals[i] for i in have]), 20),
                weights=[np.full(len(vals[i]), 1 / len(vals[i])) for i in have],
                color=[f"C{i}" for i in have], label=[runs[i].label for i in have])
        ax.set(xlabel="staleness/mean of a step (versions)", ylabel="share of steps")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_false_skip(runs):
    return line_figure(runs, [Panel([("selector/false_skip_rate", "-")], "false-skip rate", smooth=True)],
                       width=10, faint_raw=True)


def plot_difficulty(runs):
    keys = [("rollout/difficulty_mean", "-"), ("train/difficulty_mean", "--")]
    return line_figure(runs, [Panel(keys, "mean past solve rate (higher = easier)", smooth=True)], width=10)


# (file stem, heading, what it shows / which keys it needs, plot function)
PLOTS = [
    ("reward", "Reward", "reward/mean vs learner step and vs cumulative rollouts (faint: raw)", plot_reward),
    ("eval", "Eval accuracy", "every eval/*accuracy and avg@k key; one line style per set", plot_eval),
    ("zero_variance", "Zero-variance groups", "rollout/easy_ratio (solid), rollout/hard_ratio (dashed)",
     plot_zero_variance),
    ("selector", "Selector", "selector/skipped_easy|hard per step and selector/p_easy|p_hard", plot_selector),
    ("rollouts", "Rollouts per step", "rollout/samples (solid), rollout/probe_samples (dashed)", plot_rollouts),
    ("time", "Time per step", "mean of time/generate, train, wait_learner, weight_publish; these overlap "
     "in the async pipeline, so the bar can exceed time/step", plot_time),
    ("staleness", "Staleness", "share of trained groups per lag (staleness/groups_k), or else a histogram "
     "of staleness/mean per step", plot_staleness),
    ("false_skip", "False skips", "selector/false_skip_rate", plot_false_skip),
    ("difficulty", "Difficulty bias", "mean past solve rate of the prompts rolled out "
     "(rollout/difficulty_mean, solid) vs trained on (train/difficulty_mean, dashed)", plot_difficulty),
]


# ---- page ------------------------------------------------------------------------------------

CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}"
       "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
       "img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:13px}.sw{display:inline-block;"
       "width:10px;height:10px;margin-right:6px}")


def fmt(v) -> str:
    """Table cell: ints with thousands separators, floats to 4 significant digits, absent as a dash."""
    if not present(v):
        return "–"
    if float(v).is_integer() and abs(v) >= 1 or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def summary_table(runs: list[Run]) -> str:
    rows = [summary(r.rows) for r in runs]
    cols = list(dict.fromkeys(k for s in rows for k in s))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run", *cols])
    body = "".join(
        f'<tr><td><span class="sw" style="background:{to_hex(f"C{i}")}"></span>{html.escape(r.label)}'
        f'<br><span class="note">{html.escape(str(r.dir))}</span></td>'
        + "".join(f"<td>{fmt(s.get(c))}</td>" for c in cols) + "</tr>"
        for i, (r, s) in enumerate(zip(runs, rows)))
    return f"<div style=\"overflow-x:auto\"><table><tr>{head}</tr>{body}</table></div>"  # wide: scroll, not clip


def build_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write out_dir/report.html and its report_*.png plots for the given runs; returns the HTML path."""
    if not run_dirs:
        raise SystemExit("no run directories given")
    runs = load_runs(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>Run report</h1><h2>Summary</h2>{summary_table(runs)}"]
    for stem, title, what, plot in PLOTS:
        parts.append(f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(what)}</p>")
        fig = plot(runs)
        if fig is None:   # and drop a PNG an earlier report left, so the folder matches the page
            (out_dir / f"report_{stem}.png").unlink(missing_ok=True)
            parts.append("<p class='note'><b>Omitted:</b> no run has these keys.</p>")
            continue
        fig.savefig(out_dir / f"report_{stem}.png")
        parts.append(f'<img src="report_{stem}.png" alt="{html.escape(title)}">')
    title = html.escape("Run report: " + ", ".join(r.label for r in runs))
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    p.add_argument("--out", type=Path, help="where report.html and its PNGs go (default: the first run dir)")
    a = p.parse_args(argv)
    print(build_report(a.run_dirs, a.out or a.run_dirs[0]))


if __name__ == "__main__":
    main()
