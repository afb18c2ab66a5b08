"""run.loggers: TensorBoard and W&B sinks, real packages, continued across a resume."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.sinks import open_sinks

ROOT = Path(__file__).resolve().parents[2]


def crash_then_resume(cfg, run_dir: Path) -> None:
    """Steps 0-6 logged, checkpoint at 4, crash; the resumed run logs 5-8 with other values."""
    with open_sinks(cfg, run_dir) as log:
        log.write({"step": 0, "eval/accuracy": 0.3})
        for s in range(1, 7):
            log.write({"step": s, "train/loss": float(s), "rollout/samples": 8, "reward/diff": None})
    with open_sinks(cfg, run_dir, resume_after_step=4) as log:
        for s in range(5, 9):
            log.write({"step": s, "train/loss": 100.0 + s, "rollout/samples": 8, "ok": True})


def test_tensorboard_continues_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'greso[tensorboard]' to test the tensorboard sink")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    crash_then_resume(load_config(["run.loggers=[jsonl,tensorboard]"]), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()                                    # purges what the crashed run logged past step 4
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0)]
    assert [e.value for e in events.Scalars("rollout/total_samples")] == [8.0 * s for s in range(1, 9)]
    assert not {"reward/diff", "ok"} & set(events.Tags()["scalars"])   # None and bools are not plotted
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(9))


# Run in a child: it may hide a package (sys.modules[name] = None makes `import name` fail,
# as if not installed) and W&B starts its own service process, which must end with it.
def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(ROOT), WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_missing_package_is_one_clear_line(tmp_path):
    pytest.importorskip("tensorboard", reason="needs tensorboard installed to hide it")
    out = run_child("""
        import sys
        from pipeline.config import ConfigError, load_config
        from pipeline.sinks import SinkError, open_sinks
        cfg = load_config(["run.loggers=[jsonl,tensorboard]"])
        sys.modules["tensorboard"] = None                    # uninstalled, as far as import can tell
        try:
            load_config(["run.loggers=[jsonl,tensorboard]"])
        except ConfigError as e:
            print("config:", e)
        try:
            open_sinks(cfg, sys.argv[1])
        except SinkError as e:
            print("sink:", e)
    """, str(tmp_path))
    assert out.returncode == 0, out.stderr
    config, sink = out.stdout.strip().splitlines()
    assert config == "config: run.loggers: tensorboard needs the tensorboard package: " \
                     "pip install 'greso[tensorboard]' (or pip install tensorboard)"
    assert sink == "sink: " + config[len("config: "):]


def test_wandb_missing_fails_at_config_time():
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"^run.loggers: wandb needs the wandb package: pip install 'greso\[wandb\]'"):
        load_config(["run.loggers=[jsonl,wandb]"])


def test_config_rejects_bad_logger_lists():
    for value, why in [("[tensorboard]", "must include jsonl"), ("[jsonl,jsonl]", "twice"),
                       ("[jsonl,mlflow]", "unknown logger 'mlflow'")]:
        with pytest.raises(ConfigError, match=why):
            load_config([f"run.loggers={value}"])
    assert list(load_config([]).run.loggers) == ["jsonl"]


def test_wandb_offline_resumes_the_same_run(tmp_path):
    spec = importlib.util.find_spec("wandb")
    if spec is None:
        pytest.skip("pip install 'greso[wandb]' to test the wandb sink")
    site = str(Path(spec.origin).parents[1])           # where wandb lives, appended in the child
    out = run_child("""
        import json, sys
        from pathlib import Path
        sys.path.append(sys.argv[2])
        from pipeline.config import load_config
        from pipeline.sinks import open_sinks
        from tests.unit.test_sinks import crash_then_resume
        run_dir = Path(sys.argv[1])
        cfg = load_config(["run.loggers=[jsonl,wandb]"])
        crash_then_resume(cfg, run_dir)
        with open_sinks(cfg, run_dir, resume_after_step=8) as log:
            mode, run_id = log.extra["wandb"].run.settings.mode, log.extra["wandb"].run.id
        print(json.dumps({"mode": mode, "id": run_id}))
    """, str(tmp_path), site)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    stored = (tmp_path / "wandb_run_id").read_text().strip()
    assert got == {"mode": "offline", "id": stored}    # no WANDB_API_KEY: offline, one id throughout
    pieces = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert pieces and all(p.endswith(f"-{stored}") for p in pieces)   # `wandb sync` joins them in order
