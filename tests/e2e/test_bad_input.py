"""run.py on bad input: one line `error: ...`, exit code 2, and (where it can be known then) no Ray started.

Each run.main call runs in a fresh interpreter so "Ray was never started" is a fact about that
run, not about whatever Ray session the rest of the test suite holds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import run

REPO = Path(__file__).resolve().parents[2]
PROBE = ("import sys, run; rc = run.main(sys.argv[1:]); "
         "print(rc, 'ray' in sys.modules and sys.modules['ray'].is_initialized())")


def main_in_fresh_process(*argv: str) -> tuple[int, bool, list[str]]:
    """run.main(argv) in a new interpreter: (its return code, whether Ray got started, stderr lines)."""
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    rc, ray_started = out.stdout.split()[-2:]
    return int(rc), ray_started == "True", out.stderr.strip().splitlines()


def test_more_generators_than_cpus_refuses_before_ray(tmp_path):
    rc, ray_started, err = main_in_fresh_process("rollout.num_generators=8", f"run.dir={tmp_path}/run")
    assert (rc, ray_started) == (2, False)
    assert len(err) == 1 and err[0].startswith("error: preflight: the run needs 5 CPU (generators 8 x")


def test_bad_training_data_refuses_before_ray(random_world, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": []}) + "\n")
    rc, ray_started, err = main_in_fresh_process(
        f"model.path={random_world.model_dir}", f"data.train={data}", "reward.kind=math",
        f"eval.sets=[{{name: own, path: {data}}}]", f"run.dir={tmp_path}/run")
    assert (rc, ray_started) == (2, False)
    assert err[-1] == (f"error: data.train: {data}: no usable row: of 1 rows, 1 had an answer that is not a string"
                       ", a number or a list of them (a dict, boolean, []); columns found: answer, problem")
    assert not any("Traceback" in line for line in err)


def test_missing_model_dir_refuses_before_ray(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "a", "answer": "1"}\n')
    rc, ray_started, err = main_in_fresh_process("model.path=/nonexistent", f"data.train={data}", "reward.kind=math",
                                                 f"eval.sets=[{{name: own, path: {data}}}]")
    assert (rc, ray_started) == (2, False)
    assert err == ["error: model.path: no such directory: /nonexistent (a local model directory or a hub name owner/model)"]


def test_cli_refuses_eight_generators_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "rollout.num_generators=8", f"run.dir={tmp_path}/run"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "CPU" in out.stderr


@pytest.mark.slow
def test_an_attached_cluster_too_small_is_refused_after_ray_init(ray_session, tmp_path, tiny_cache, capsys):
    """ray.address != local: only the running cluster knows its size; the driver asks it right after init."""
    rc = run.main(["ray.address=auto", "train.num_workers=4", f"run.dir={tmp_path}/run", f"data.tiny.cache_dir={tiny_cache}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: preflight: the run needs 3 CPU") and "cluster has 2;" in err[-1]
    assert ray_session.is_initialized()   # the test's session: not shut down by the refused run
