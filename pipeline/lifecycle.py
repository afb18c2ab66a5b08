"""A run's life outside the pipeline: what run.resume decides, a graceful stop, how to resume.

Nothing here starts actors: `pipeline.driver` calls these around each life of the pipeline.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline import checkpoint as ck

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run cannot go on; the message is one line naming the stage and how to resume."""


def plan_resume(cfg, run_dir: Path):
    """run.resume -> (Plan, the checkpoint's pipeline state or None); checks a resume still fits."""
    plan = ck.plan(run_dir, cfg.run.resume, overwrite=cfg.run.overwrite, total_steps=cfg.trainer.total_steps)
    log.info(plan.message)
    if plan.kind != "resume":
        return plan, None
    ck.check_compatible(ck.read_manifest(plan.checkpoint)["config"], OmegaConf.to_container(cfg), plan.checkpoint)
    return plan, _load(plan, run_dir)


def plan_restart(run_dir: Path):
    """After a stage failure: the newest complete checkpoint of this run, or the start."""
    found = ck.checkpoints(run_dir)
    if not found:
        return ck.Plan("fresh", None, 0, "no checkpoint yet: restarting from the start"), None
    step, path = found[-1]
    plan = ck.Plan("resume", path, step, f"restarting from {path}")
    return plan, _load(plan, run_dir)


def _load(plan, run_dir: Path) -> dict:
    ck.check_ray_train_snapshot(run_dir)
    return json.loads((plan.checkpoint / "pipeline.json").read_text())


def resume_command(run_dir: Path) -> str:
    """The command line of this process, with run.dir pinned and run.resume=auto."""
    args = [a for a in sys.argv[1:] if not a.startswith(("run.dir=", "run.resume=", "run.overwrite=", "faults."))]
    return " ".join(["python", "run.py", *args, f"run.dir={run_dir}", "run.resume=auto"])


class GracefulStop:
    """First SIGINT / SIGTERM: finish the step, checkpoint, shut down. Second: exit at once.

    Installed after ray.init, which sets its own SIGTERM handler (ray/_private/worker.py).
    Ray's own processes block SIGINT (ray/_private/services.py preexec_fn), so a Ctrl-C in
    the terminal reaches only us and the shutdown below is ours to do.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: exiting now")
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(again to exit at once, without one)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def eval_due(cfg, step: int) -> bool:
    """Is `step` an evaluation step (every eval.every steps, and the last)?"""
    return step == cfg.trainer.total_steps or bool(cfg.eval.every and step % cfg.eval.every == 0)
