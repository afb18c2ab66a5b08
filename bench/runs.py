"""Shared by the benchmarks: run run.py once as a subprocess and read its metrics.jsonl."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_config(name: str, out: Path, overrides: list[str]) -> tuple[Path, float]:
    """`python run.py OVERRIDES` into out/NAME (log: out/NAME.log); returns (run dir, wall seconds).

    Each run is its own process with its own local Ray, so runs never compete for CPUs.
    """
    run_dir = out / name
    cmd = [sys.executable, str(ROOT / "run.py"), *overrides, f"run.dir={run_dir}", f"run.name={name}",
           "ray.dashboard=false"]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{name}: run.py exited {rc}; see {out / f'{name}.log'}")
    return run_dir, wall


def read_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(all rows, training-step rows) of a run's metrics.jsonl (read by pipeline.runlog)."""
    from pipeline.runlog import read_rows as rows_of
    rows = rows_of(run_dir)
    steps = [r for r in rows if "train/loss" in r]
    if not steps:
        raise SystemExit(f"{run_dir}: no training steps in metrics.jsonl")
    return rows, steps


def prepare(overrides: list[str]) -> None:
    """Build the (tiny) world once up front so no timed run pays for the warm start."""
    from pipeline.config import load_config
    from pipeline.world import load_world
    load_world(load_config(overrides))


def with_conf(overrides: list[str], steps: int | None) -> list[str]:
    """conf=tiny unless a conf= is given; trainer.total_steps=steps when set."""
    out = list(overrides)
    if not any(o.startswith("conf=") for o in out):
        out.insert(0, "conf=tiny")
    if steps:
        out.append(f"trainer.total_steps={steps}")
    return out
