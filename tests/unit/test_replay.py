"""bench.replay: every real selector on simulated rewards keeps its books, and they rank as the paper says."""
import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from bench.replay import RewardModel, World, consistency, main, replay, selector_names

SMALL = RewardModel(prompts=2000, batch_size=32, sampling_batch=48)
# Solve rates frozen in time: a prompt that was zero-variance stays as likely to be so again.
STATIC = replace(SMALL, gain=0.0, noise_sd=0.0, unsolvable=0.2, difficulty_sd=4.0, ability0=2.0)


@pytest.fixture(scope="module")
def rows():
    return {name: replay(name, SMALL, steps=20, seed=0) for name in selector_names()}


def test_every_selector_keeps_its_books(rows):
    assert {"none", "dynamic_sampling", "greso", "oracle"} <= set(rows)
    for name, r in rows.items():
        # issued is counted from the cursor, the rest from what pick() returned and what was rolled out
        assert r["issued"] == r["rolled_out"] + r["skipped"], name
        assert r["samples"] == 8 * (r["rolled_out"] + r["probes"]), name
        assert r["probe_samples"] == 8 * r["probes"] and r["probes"] <= r["skipped"], name
        assert r["steps"] == 20 and r["effective_groups"] <= 20 * 32, name


def test_oracle_wastes_nothing_and_is_the_floor(rows):
    o = rows["oracle"]
    assert o["wasted_fraction"] == 0.0 and o["probe_samples"] == 0
    assert o["rollouts_per_effective"] == 8.0 and o["effective_groups"] == 20 * 32
    assert o["skipped"] > 0                       # it did meet zero-variance candidates
    assert all(r["rollouts_per_effective"] >= 8.0 for r in rows.values())


def test_oracle_wastes_nothing_when_one_pass_meets_a_prompt_twice():
    tiny = replace(STATIC, prompts=40)            # ~100 candidates a step: the cursor wraps inside pick()
    o = replay("oracle", tiny, steps=10, seed=0)
    assert o["issued"] > 10 * tiny.prompts and o["wasted_fraction"] == 0.0


def test_none_trains_on_whatever_comes(rows):
    r = rows["none"]
    assert r["skipped"] == 0 and r["samples"] == 8 * 32 * 20
    # its effective groups are the mixed ones among the B it trains on
    zero_variance_groups = round(r["wasted_fraction"] * 32 * 20)
    assert 0 < zero_variance_groups and r["effective_groups"] == 32 * 20 - zero_variance_groups


def test_dynamic_sampling_wastes_the_zero_variance_share():
    row = replay("dynamic_sampling", STATIC, steps=30, seed=1)
    share = float(World(STATIC, seed=1).zero_variance_probability().mean())   # closed form, frozen world
    se = math.sqrt(share * (1 - share) / row["rolled_out"])
    assert abs(row["wasted_fraction"] - share) < 4 * se


def test_greso_needs_fewer_rollouts_than_dynamic_sampling_when_zero_variance_persists():
    ds = replay("dynamic_sampling", STATIC, steps=60, seed=0)
    greso = replay("greso", STATIC, steps=60, seed=0)
    assert greso["skipped"] > 0
    assert greso["rollouts_per_effective"] < 0.85 * ds["rollouts_per_effective"]


def test_consistency_matches_a_naive_count():
    rng = np.random.default_rng(0)
    table = {e: (rng.random(50) < 0.6).astype(np.int8) for e in range(4)}
    table[4] = np.full(50, -1, dtype=np.int8)           # an incomplete epoch is left out
    got = consistency(table)
    for e in range(1, 4):
        earlier = [any(table[k][i] for k in range(e)) for i in range(50)]
        now = [bool(table[e][i]) for i in range(50)]
        both = sum(a and b for a, b in zip(earlier, now))
        assert got["cur_given_prev"][e + 1] == pytest.approx(both / sum(earlier))
        assert got["prev_given_cur"][e + 1] == pytest.approx(both / sum(now))
    assert set(got["cur_given_prev"]) == {2, 3, 4}


def test_cli_prints_the_simulation_warning_and_writes_json(tmp_path, capsys):
    out = tmp_path / "replay.json"
    main(["--steps", "3", "--prompts", "600", "--seed", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.lower().startswith("simulation of reward dynamics, not training")
    assert "greso vs dynamic_sampling: rollouts x" in printed
    dumped = json.loads(out.read_text())
    assert [r["selector"] for r in dumped["rows"]] == selector_names()
    assert dumped["model"]["prompts"] == 600 and dumped["seed"] == 2


def test_the_bench_imports_no_ray():
    code = "import sys, bench.replay; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=".").returncode == 0
