"""Durable runs end to end on the tiny world: a real SIGINT and resume, real SIGKILLs of stages.

Each run is a `python run.py` subprocess with its own local Ray whose temp dir (RAY_TMPDIR) is
private to the test, so "nothing left running" is checked on exactly the processes it started.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LEDGER = ["ledger/trained", "ledger/filtered", "ledger/dropped_stale", "ledger/carried", "ledger/in_flight",
          "ledger/reissued"]
B = 32   # conf=tiny's train.batch_size


@pytest.fixture
def ray_tmp():
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # short: Ray's socket paths live under it
    yield d
    left = _ray_processes(d)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"Ray processes left running: {left}"


def _ray_processes(tmp: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", tmp], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def _cmd(run_dir: Path, tiny_cache: str, *overrides: str) -> list[str]:
    return [sys.executable, "run.py", f"run.dir={run_dir}", f"data.tiny.cache_dir={tiny_cache}",
            "ray.dashboard=false", "eval.every=10", "eval.sets.0.limit=64", *overrides]


def _run(args: list[str], ray_tmp: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_complete(rows: list[dict], total: int) -> None:
    """Every step exactly once, the ledger balanced on every row, exactly total x B trained."""
    assert [r["step"] for r in rows] == list(range(total + 1))
    for r in rows[1:]:
        assert r["ledger/issued"] == sum(r[k] for k in LEDGER), r["step"]
    assert rows[-1]["ledger/trained"] == total * B
    assert sum(r["train/effective_groups"] for r in rows[1:]) == total * B


def test_sigint_stops_with_a_checkpoint_and_resume_finishes_exactly(tmp_path, tiny_cache, ray_tmp):
    run_dir = tmp_path / "run"
    args = _cmd(run_dir, tiny_cache, "trainer.total_steps=30", "trainer.save_every=10")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 900
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 12):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 12"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert not _ray_processes(ray_tmp), "the stopped run left Ray processes behind"
    stopped = _rows(run_dir)[-1]["step"]
    assert 12 <= stopped < 30 and f"stopped after step {stopped}" in out and "run.resume=auto" in out
    ckpt = run_dir / "checkpoints" / f"step_{stopped}"
    carried = json.loads((ckpt / "pipeline.json").read_text())["carried"]

    res = _run(_cmd(run_dir, tiny_cache, "trainer.total_steps=30", "trainer.save_every=10"), ray_tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = _rows(run_dir)
    _assert_complete(rows, 30)
    after = rows[stopped + 1:]
    assert after[0]["ledger/reissued"] > 0 or not carried       # what was in flight at the stop went out again
    restored = sum(r["train/restored_groups"] + r["train/restored_stale"] for r in after)
    assert restored == len(carried)                              # every restored group trained or aged out
    assert sum(r["train/restored_groups"] for r in after) > 0 or not carried

    # the finished run: final/ loads as it is, and evaluating it gives the run's last held-out accuracy
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None
    ev = _run([sys.executable, "-m", "pipeline.evaluate", str(run_dir / "final"), "ray.dashboard=false"], ray_tmp)
    assert ev.returncode == 0, ev.stderr[-2000:]
    got = json.loads((run_dir / "final" / "eval.json").read_text())
    assert abs(got["metrics"]["eval/accuracy"] - rows[-1]["eval/accuracy"]) <= 0.005

    again = _run(_cmd(run_dir, tiny_cache, "trainer.total_steps=30"), ray_tmp, timeout=300)
    assert again.returncode == 0 and "finished at step 30" in again.stdout
    other = _run(_cmd(run_dir, tiny_cache, "trainer.total_steps=40", "selector.name=mopps"), ray_tmp, timeout=300)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith("error: selector.name:")   # after the log lines


def test_a_killed_generator_is_restarted_and_its_work_reissued(tmp_path, tiny_cache, ray_tmp):
    run_dir = tmp_path / "run"
    res = _run(_cmd(run_dir, tiny_cache, "trainer.total_steps=20", "rollout.num_generators=2",
                    "rollout.num_cpus=0.25", "faults.kill=generator:1@step=6"), ray_tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    died = re.search(r"generator 1 died .*: Ray restarts it; (\d+) prompts it held re-issued", res.stderr)
    assert died, res.stderr[-2000:]
    rows = _rows(run_dir)
    _assert_complete(rows, 20)
    # what it held when killed (nothing, if it was between requests) went out again, and only that
    assert rows[-1]["ledger/reissued"] == sum(r["rollout/reissued"] for r in rows[1:]) == int(died.group(1))


def test_a_killed_learner_restarts_from_its_checkpoint(tmp_path, tiny_cache, ray_tmp):
    run_dir = tmp_path / "run"
    res = _run(_cmd(run_dir, tiny_cache, "trainer.total_steps=20", "trainer.save_every=10",
                    "faults.kill=learner@step=13"), ray_tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "restarting the pipeline from" in res.stderr and "step_10" in res.stderr
    _assert_complete(_rows(run_dir), 20)


def test_a_killed_rewarder_restarts_from_the_checkpoint_with_its_groups_restored(tmp_path, tiny_cache, ray_tmp):
    run_dir = tmp_path / "run"
    res = _run(_cmd(run_dir, tiny_cache, "trainer.total_steps=20", "trainer.save_every=10",
                    "faults.kill=rewarder@step=12"), ray_tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rewarder: the actor died" in res.stderr and "step_10" in res.stderr
    rows = _rows(run_dir)
    _assert_complete(rows, 20)
    carried = json.loads((run_dir / "checkpoints" / "step_10" / "pipeline.json").read_text())["carried"]
    assert sum(r["train/restored_groups"] + r["train/restored_stale"] for r in rows[11:]) == len(carried)


def test_a_killed_selector_ends_the_run_in_one_line_with_the_resume_command(tmp_path, tiny_cache, ray_tmp):
    run_dir = tmp_path / "run"
    res = _run(_cmd(run_dir, tiny_cache, "trainer.total_steps=20", "trainer.save_every=4",
                    "faults.kill=selector@step=5"), ray_tmp)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: selector: the actor died") and "run.resume=auto" in last and "step_4" in last


def test_a_stalled_generator_trips_the_watchdog(tmp_path, tiny_cache, ray_tmp):
    run_dir = tmp_path / "run"
    res = _run(_cmd(run_dir, tiny_cache, "trainer.total_steps=20", "faults.stall=generator:0@step=3",
                    "pipeline.step_timeout_s=40"), ray_tmp)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: watchdog: no learner step for 40 s") and "stalled stage: generator 0" in last
    assert [r["step"] for r in _rows(run_dir)][-1] >= 3                 # it trained until the stall
