"""Run-directory outputs: metrics.jsonl (one JSON object per step) and the progress bar."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    """Appends one JSON row per step, flushed at once so a crash keeps every finished step."""

    def __init__(self, path: Path, resume_after_step: int | None = None):
        self.path, self.total_samples, self.total_probe_samples = path, 0, 0
        self.resume_after_step, self.last_step = resume_after_step, -1

    def __enter__(self) -> "MetricsLog":
        if self.resume_after_step is None:
            self.f = open(self.path, "x")
            return self
        kept = []
        if self.path.exists():   # rows a crash wrote after the checkpoint go; so does a torn last line
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if row.get("step", 0) <= self.resume_after_step:
                    kept.append(line)
                    self.last_step = row["step"]
                    self.total_samples += row.get("rollout/samples", 0)
                    self.total_probe_samples += row.get("rollout/probe_samples", 0)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self.f = open(self.path, "a")
        return self

    def write(self, row: dict) -> None:
        self.total_samples += row.get("rollout/samples", 0)
        self.total_probe_samples += row.get("rollout/probe_samples", 0)
        if "train/loss" in row:   # cumulative: samples trained on or filtered, and probe samples apart
            row["rollout/total_samples"] = self.total_samples
            row["rollout/total_probe_samples"] = self.total_probe_samples
        self.f.write(json.dumps(row, default=float) + "\n")
        self.f.flush()
        self.last_step = row.get("step", self.last_step)

    def __exit__(self, *exc) -> None:
        self.f.close()


class Progress:
    """tqdm bar with the numbers a GRESO user watches: reward, zero-variance, skips, speed."""

    def __init__(self, total: int, initial: int = 0):
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.eval = None

    def __enter__(self) -> "Progress":
        return self

    def update(self, row: dict) -> None:
        skipped = row.get("selector/skipped_easy", 0) + row.get("selector/skipped_hard", 0)
        considered = skipped + row.get("rollout/prompts", 0)
        self.eval = row.get("eval/accuracy", self.eval)
        self.bar.set_postfix({
            "reward": f"{row.get('reward/mean', 0):.2f}", "zv": f"{row.get('rollout/zero_variance_ratio', 0):.0%}",
            "skip": f"{skipped / considered:.0%}" if considered else "0%",
            "roll/s": f"{row.get('rollout/samples', 0) / max(row.get('time/step', 0), 1e-9):.0f}",
            "stale": f"{row.get('staleness/mean', 0):.1f}",
            **({"eval": f"{self.eval:.2f}"} if self.eval is not None else {})}, refresh=False)
        self.bar.update(1)

    def __exit__(self, *exc) -> None:
        self.bar.close()
