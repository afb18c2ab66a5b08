"""python -m pipeline.evaluate: a saved model scores what the run logged for the same weights."""
from __future__ import annotations

import json
import shutil

import pytest

import run
from pipeline import evaluate
from pipeline.tiny import build_tiny_world

SLOW, ON_RAY = pytest.mark.slow, pytest.mark.usefixtures("ray_session")   # only the tests that evaluate


@SLOW
@ON_RAY
def test_cli_matches_the_runs_step0_eval(tmp_path, tiny_cache, capsys):
    """The warm-start model, evaluated by the CLI, scores exactly the step-0 eval/accuracy the
    run logged (same prompts, greedy); the run's own config.yaml supplies those prompts."""
    run_dir = tmp_path / "run"
    assert run.main([f"run.dir={run_dir}", f"data.tiny.cache_dir={tiny_cache}", "trainer.total_steps=1",
                     "eval.sets.0.limit=96", "rollout.num_generators=2"]) == 0
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    world = build_tiny_world(tiny_cache, log=lambda *_: None)
    model = run_dir / "warm_start"                     # inside the run dir: its config is found
    shutil.copytree(world.model_dir, model)            # a copy: eval.json must not land in the shared cache
    capsys.readouterr()
    assert evaluate.main([str(model)]) == 0
    out = capsys.readouterr().out
    report = json.loads((model / "eval.json").read_text())
    assert report["config"] == str(run_dir / "config.yaml")
    assert report["metrics"]["eval/heldout/prompts"] == logged["eval/heldout/prompts"] == 96
    assert report["metrics"]["eval/accuracy"] == logged["eval/accuracy"]           # exactly
    assert report["sets"] == [{"name": "heldout", "prompts": 96, "accuracy": logged["eval/accuracy"]}]
    line = next(line for line in out.splitlines() if line.startswith("heldout"))
    assert line.split() == ["heldout", "96", f"{logged['eval/accuracy']:.4f}", "-"]


@SLOW
@ON_RAY
def test_cli_overrides_and_avg_k(tmp_path, tiny_cache, capsys):
    """Outside a run dir: conf=tiny plus overrides; avg@k appears in the table and eval.json."""
    world = build_tiny_world(tiny_cache, log=lambda *_: None)
    model = tmp_path / "model"
    shutil.copytree(world.model_dir, model)
    assert evaluate.main([str(model), f"data.tiny.cache_dir={tiny_cache}", "eval.sets.0.limit=32",
                          "eval.sets.0.avg_k=4"]) == 0
    report = json.loads((model / "eval.json").read_text())
    assert report["config"] == "conf=tiny"
    (s,) = report["sets"]
    assert s["prompts"] == 32 and 0 <= s["avg@4"] <= 1 and "eval/heldout/avg@4" in report["metrics"]
    assert "(k=4)" in capsys.readouterr().out


@pytest.mark.parametrize("make, why", [
    (lambda d: d / "missing", "no such directory"),
    (lambda d: d, "not a Hugging Face model directory (no readable config.json)"),
    (lambda d: [(d / "config.json").write_text("{}"), d][1], "no safetensors weights"),
])
def test_cli_refuses_what_is_not_a_model_dir_with_one_line(tmp_path, capsys, make, why):
    assert evaluate.main([str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and len(err.splitlines()) == 1


def test_cli_usage_and_config_errors(tmp_path, random_world, capsys):
    assert evaluate.main([]) == 2 and "usage:" in capsys.readouterr().err
    model = tmp_path / "model"
    shutil.copytree(random_world.model_dir, model)
    assert evaluate.main([str(model), "eval.sets.0.limt=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "config error: eval.sets.0.limt: unknown key (did you mean eval.sets.0.limit?)"
