"""Run-directory outputs: metrics.jsonl (one JSON object per step) and the progress bar."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from tqdm import tqdm

# errnos that mean "no room for this row": a full disk, a full quota, a file-size limit
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class MetricsError(RuntimeError):
    """metrics.jsonl cannot be opened, resumed or written; the message is one line naming the file."""


class MetricsLog:
    """Appends one JSON row per step, whole or not at all, so a crash keeps every finished step.

    Each row is one write() of the complete line, then fsync; if the write fails (a full
    disk), the file is cut back to where the row began. A fresh log refuses a file that
    already holds rows (it never truncates one); `resume_after_step=N` continues a file
    after a checkpoint of step N: rows past N (written by the crashed run after its
    checkpoint) and a half last line are dropped, the cumulative counters are summed
    back from the rows kept, and new rows are appended.
    """

    def __init__(self, path: Path, resume_after_step: int | None = None):
        self.path, self.resume_after_step = Path(path), resume_after_step
        self.total_samples, self.total_probe_samples = 0, 0
        self.last_step: int | None = None   # step of the file's last row (after a resume's trim)
        self.dropped = 0                    # rows a resume dropped (past its step, or a half line)
        self.fd: int | None = None

    def __enter__(self) -> "MetricsLog":
        if self.resume_after_step is None:
            if self.path.exists() and self.path.stat().st_size > 0:
                raise MetricsError(f"{self.path}: already holds a run's metrics; resume that run or "
                                   "choose another run.dir (refusing to overwrite it)")
        else:
            self._trim(self.resume_after_step)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self

    def write(self, row: dict) -> None:
        samples = self.total_samples + row.get("rollout/samples", 0)
        probes = self.total_probe_samples + row.get("rollout/probe_samples", 0)
        if "train/loss" in row:   # cumulative: samples trained on or filtered, and probe samples apart
            row["rollout/total_samples"] = samples
            row["rollout/total_probe_samples"] = probes
        self._append((json.dumps(row, default=float) + "\n").encode(), row.get("step"))
        self.total_samples, self.total_probe_samples = samples, probes   # only once the row is on disk
        self.last_step = row.get("step", self.last_step)

    def _append(self, line: bytes, step) -> None:
        """One write() of the whole line (looping only if the kernel took part of it), then fsync."""
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            os.ftruncate(self.fd, end)   # no half row: the file ends where the last whole row did
            why = "disk full" if e.errno in NO_SPACE else "write failed"
            raise MetricsError(f"{self.path}: {why}, step {step} not written ({e.strerror}); "
                               "free space, then resume the run") from None

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _trim(self, step: int) -> None:
        """Keep the rows of steps <= step, drop the rest and any half last line; restore the counters."""
        if not self.path.exists():
            return
        lines = self.path.read_bytes().split(b"\n")
        kept = []
        for i, raw in enumerate(lines[:-1], 1):   # lines[-1] is b"" or a half line without its "\n"
            if not raw.strip():
                continue
            row = _parse(raw, self.path, i)
            if row["step"] <= step:
                kept.append(raw)
                self.total_samples += row.get("rollout/samples", 0)
                self.total_probe_samples += row.get("rollout/probe_samples", 0)
                self.last_step = row["step"]
        self.dropped = sum(1 for raw in lines[:-1] if raw.strip()) - len(kept) + bool(lines[-1].strip())
        if self.dropped:
            _replace(self.path, b"".join(raw + b"\n" for raw in kept))


def _parse(raw: bytes, path: Path, lineno: int) -> dict:
    """A whole metrics row; a broken one mid-file is not ours to guess at."""
    try:
        row = json.loads(raw)
    except ValueError:
        row = None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise MetricsError(f"{path}:{lineno}: not a metrics row (a JSON object with an integer step); "
                           "fix or delete that line, then resume")
    return row


def _replace(path: Path, data: bytes) -> None:
    """Write data beside path, fsync, then rename over it: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.resume-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)   # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


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
