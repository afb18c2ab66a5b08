"""GRESO on Ray: train an LLM reasoner with selective rollouts.

    python run.py                          # conf=tiny: the whole pipeline on a laptop CPU
    python run.py conf=qwen7b              # the paper's 7B setup on a Ray cluster
    python run.py selector.name=dynamic_sampling trainer.total_steps=20
    python run.py conf=qwen7b --cfg        # print the merged config and exit

Bad input (a config value, a data file, a model path, a cluster too small) ends the run
with `error: <one line>` and exit code 2, before Ray starts where it can be known then.
"""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from pipeline.errors import find_user_error
    try:
        return _main(argv)
    except Exception as e:   # a user error, maybe raised inside an actor: one line; else our bug
        message = find_user_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    from pipeline.config import load_config, resolved_yaml
    if "-h" in argv or "--help" in argv:
        print(__doc__)
    cfg = load_config([a for a in argv if not a.startswith("-")])
    if "--cfg" in argv or "-h" in argv or "--help" in argv:
        print(resolved_yaml(cfg))
        return 0
    from pipeline.preflight import check_before_ray
    check_before_ray(cfg)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pipeline.checkpoint import ResumeError
    from pipeline.driver import run
    from pipeline.lifecycle import RunFailed
    from pipeline.metrics import MetricsError
    try:
        run_dir = run(cfg)
    except (ResumeError, MetricsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:      # a stage died for good, or the watchdog found a hang: one line, how to resume
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:   # a second Ctrl-C: the run's own processes are already shut down
        print(f"interrupted: {e or 'exiting'}", file=sys.stderr)
        return 130
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
