"""Where a run's metric rows go: metrics.jsonl always, TensorBoard and W&B when run.loggers names them.

    with open_sinks(cfg, run_dir, resume_after_step=None) as log:   # N after a checkpoint of step N
        log.write(row)                                                # one row per step, "step" = x axis

Every sink continues across a resume: metrics.jsonl drops rows past the checkpoint
(pipeline.metrics), TensorBoard writes into the same RUN_DIR/tensorboard with
`purge_step` so events a crash logged past the checkpoint are hidden, and W&B resumes
the run whose id is kept in RUN_DIR/wandb_run_id. The optional packages are imported
only when named; config validation has already said which one is missing.
"""
from __future__ import annotations

import logging
import os
import uuid
from numbers import Real
from pathlib import Path
from typing import Protocol

from pipeline.metrics import MetricsLog

log = logging.getLogger(__name__)


class SinkError(RuntimeError):
    """An optional sink cannot start (package missing); the message is one line."""


class Sink(Protocol):
    def write(self, row: dict) -> None:
        """Record one metrics row; row["step"] is the learner step."""

    def close(self) -> None:
        """Flush and release what the sink holds."""


def scalars(row: dict) -> dict[str, float]:
    """The plotable part of a row: real numbers, without the step itself (None and bools are not plots)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, Real) and not isinstance(v, bool)}


def _need(package: str):
    try:
        return __import__(package)
    except ImportError:
        raise SinkError(f"run.loggers: {package} needs the {package} package: "
                        f"pip install 'greso[{package}]' (or pip install {package})") from None


class TensorBoardSink:
    """Scalars under the metric keys in RUN_DIR/tensorboard, x = step."""

    def __init__(self, log_dir: Path, resume_after_step: int | None = None):
        _need("tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        # purge_step (torch/utils/tensorboard/writer.py): TensorBoard hides the old files' events
        # at steps >= it, i.e. what a crash logged after the checkpoint we resume from.
        purge = None if resume_after_step is None else resume_after_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=10)

    def write(self, row: dict) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run directory: its id is kept in RUN_DIR/wandb_run_id so a resume continues it.

    Offline (files under RUN_DIR/wandb, `wandb sync` uploads them later, a resumed run's
    pieces in order) unless WANDB_API_KEY is set or WANDB_MODE says otherwise. Every key
    is plotted against our "step" rather than W&B's own counter, which refuses steps that
    go back: after a crash, the steps past the checkpoint are logged again.
    """

    def __init__(self, run_dir: Path, cfg):
        wandb = _need("wandb")
        from omegaconf import OmegaConf
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "greso"), name=cfg.run.name, id=run_id,
                              resume="allow", dir=str(run_dir), mode=mode,
                              config=OmegaConf.to_container(cfg, resolve=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, row: dict) -> None:
        self.run.log({"step": row["step"], **scalars(row)})

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """metrics.jsonl plus the optional sinks; a row goes to all of them.

    metrics.jsonl is the run's record, so its errors stop the run; an optional sink that
    fails mid-run is logged once and switched off rather than ending a days-long run.
    """

    def __init__(self, metrics: MetricsLog, extra: dict[str, Sink]):
        self.metrics, self.extra = metrics, extra

    def write(self, row: dict) -> None:
        self.metrics.write(row)                  # adds the cumulative counters the others plot too
        for name, sink in list(self.extra.items()):
            try:
                sink.write(row)
            except Exception as e:
                log.warning("run.loggers: %s failed at step %s and is off for the rest of the run: %s",
                            name, row.get("step"), e)
                self.extra.pop(name)

    def __enter__(self) -> "Sinks":
        return self

    def __exit__(self, *exc) -> None:
        try:
            for sink in self.extra.values():
                sink.close()
        finally:
            self.metrics.__exit__(*exc)


def open_sinks(cfg, run_dir: Path, resume_after_step: int | None = None) -> Sinks:
    """Open metrics.jsonl (fresh, or continued after step N) and every other sink in run.loggers."""
    run_dir = Path(run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_after_step).__enter__()
    extra: dict[str, Sink] = {}
    try:
        for name in cfg.run.loggers:
            if name == "tensorboard":
                extra[name] = TensorBoardSink(run_dir / "tensorboard", resume_after_step)
            elif name == "wandb":
                extra[name] = WandbSink(run_dir, cfg)
    except BaseException:
        Sinks(metrics, extra).__exit__(None, None, None)
        raise
    return Sinks(metrics, extra)
