"""Checkpoint layout, run.resume decisions and the compatibility check (pure, no Ray, no torch)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from pipeline import checkpoint as ck
from pipeline.types import Prompt, RolloutGroup, Sample, ScoredGroup

CFG = {"selector": {"name": "greso"}, "rollout": {"n": 8}, "train": {"batch_size": 32},
       "model": {"path": "tiny", "tokenizer": ""}, "data": {"train": "tiny", "limit": None}, "run": {"seed": 0}}


def _checkpoint(run_dir, step: int, manifest: bool = True):
    tmp = ck.step_dir(run_dir, step).with_name(f"step_{step}.tmp")
    (tmp / "policy").mkdir(parents=True)
    (tmp / "policy" / "config.json").write_text("{}")
    (tmp / "pipeline.json").write_text("{}")
    if manifest:
        return ck.commit(tmp, ck.step_dir(run_dir, step), step=step, config=CFG)
    tmp.rename(ck.step_dir(run_dir, step))
    return ck.step_dir(run_dir, step)


def test_commit_writes_the_manifest_last_and_renames(tmp_path):
    d = _checkpoint(tmp_path, 20)
    m = ck.read_manifest(d)
    assert d.name == "step_20" and not d.with_name("step_20.tmp").exists()
    assert m["step"] == 20 and m["files"] == ["pipeline.json", "policy/config.json"] and m["config"] == CFG


def test_a_checkpoint_without_manifest_is_skipped_with_a_warning(tmp_path, caplog):
    _checkpoint(tmp_path, 20)
    _checkpoint(tmp_path, 40, manifest=False)          # interrupted while saving
    (tmp_path / "checkpoints" / "step_60.tmp").mkdir()   # never renamed
    with caplog.at_level(logging.WARNING):
        plan = ck.plan(tmp_path, "auto", overwrite=False, total_steps=100)
    assert plan.kind == "resume" and plan.step == 20 and plan.checkpoint.name == "step_20"
    assert "step_40" in caplog.text and "manifest" in caplog.text
    with pytest.raises(ck.ResumeError, match="not a complete checkpoint"):
        ck.plan(tmp_path, str(tmp_path / "checkpoints" / "step_40"), overwrite=False, total_steps=100)


def test_plan_fresh_refuse_overwrite_and_finished(tmp_path):
    assert ck.plan(tmp_path, "auto", overwrite=False, total_steps=10).kind == "fresh"
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    for resume in ("auto", "never"):                     # a run's output is never silently replaced
        with pytest.raises(ck.ResumeError, match="run.dir: .* already holds a run .*run.overwrite=true"):
            ck.plan(tmp_path, resume, overwrite=False, total_steps=10)
    plan = ck.plan(tmp_path, "never", overwrite=True, total_steps=10)
    assert plan.kind == "fresh" and not (tmp_path / "metrics.jsonl").exists()
    _checkpoint(tmp_path, 10)
    assert ck.plan(tmp_path, "auto", overwrite=False, total_steps=10).kind == "resume"   # no final/ yet
    (tmp_path / "final").mkdir()
    done = ck.plan(tmp_path, "auto", overwrite=False, total_steps=10)
    assert done.kind == "finished" and "trainer.total_steps=" in done.message
    assert ck.plan(tmp_path, "auto", overwrite=False, total_steps=20).kind == "resume"   # extending


def test_resume_refuses_a_config_that_changes_what_the_state_means(tmp_path):
    other = json.loads(json.dumps(CFG))
    other["selector"]["name"] = "mopps"
    other["train"]["lr"] = 5.0                          # may change: not checked
    with pytest.raises(ck.ResumeError, match=r"^selector.name: .*'greso'.*'mopps'") as e:
        ck.check_compatible(CFG, other, tmp_path)
    assert "\n" not in str(e.value)
    ck.check_compatible(CFG, {**CFG, "eval": {"every": 3}, "trainer": {"total_steps": 999}}, tmp_path)


def test_scored_groups_round_trip_through_json_exactly():
    g = ScoredGroup(RolloutGroup(7, Prompt("u1", (1, 2, 3), "42", "1+41="),
                                 (Sample((4, 5), "24", (-0.123456789012345, -1e-300), True),
                                  Sample((6,), "x", (-2.5,), False)), version=3, probe=False), (1.0, 0.1))
    assert ck.decode_group(json.loads(json.dumps(ck.encode_group(g)))) == g


def test_ray_train_snapshot_naming_a_missing_checkpoint_is_removed(tmp_path):
    _checkpoint(tmp_path, 20)
    snap = tmp_path / "checkpoints" / ck.RAY_TRAIN_SNAPSHOT
    snap.write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "step_20"}]}))
    ck.check_ray_train_snapshot(tmp_path)
    assert snap.exists()
    snap.write_text(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "step_20"},
                                                       {"checkpoint_dir_name": "step_40"}]}))
    ck.check_ray_train_snapshot(tmp_path)
    assert not snap.exists()


def test_export_final_links_the_policy(tmp_path):
    d = _checkpoint(tmp_path, 5)
    ck.export_final(d / "policy", tmp_path / "final")
    assert (tmp_path / "final" / "config.json").read_text() == "{}"
    assert (tmp_path / "final" / "config.json").stat().st_ino == (d / "policy" / "config.json").stat().st_ino


def test_checkpoint_module_imports_neither_torch_nor_ray():
    code = "import sys, pipeline.checkpoint; assert not {'ray', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
