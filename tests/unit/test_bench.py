"""The benchmark tables: what each column means, computed from hand-made metrics.jsonl."""
import json

import pytest

from bench import async_vs_sync, rollout_efficiency


def write_run(path, selector, steps):
    """A run dir whose every step rolled out 10 groups of 8 samples, `zv` of them zero-variance."""
    path.mkdir()
    (path / "config.yaml").write_text(f"selector:\n  name: {selector}\n")
    rows = [{"step": 0, "eval/accuracy": 0.3}]
    for i, (zv, signal, probe) in enumerate(steps, 1):
        rows.append({"step": i, "train/loss": 0.0, "rollout/samples": 80, "rollout/groups": 10,
                     "rollout/zero_variance_ratio": zv / 10, "train/signal_groups": signal,
                     "rollout/probe_samples": probe, "time/generate": 2.0, "time/step": 4.0,
                     "time/wait_learner": 1.0 * i, "staleness/mean": 1.0,
                     "ledger/issued": 10 * i, "ledger/dropped_stale": i})
    rows[-1]["eval/accuracy"] = 0.8
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_efficiency_row_counts_rollouts_waste_and_signal(tmp_path):
    row = rollout_efficiency.summarize(write_run(tmp_path / "g", "greso", [(5, 4, 8), (3, 4, 0)]), wall_s=9.0)
    assert row["selector"] == "greso" and row["steps"] == 2
    assert row["rollouts"] == 160 and row["probe_rollouts"] == 8
    assert row["per_group"] == pytest.approx(160 / 8)       # samples per trained group with a signal
    assert row["wasted"] == pytest.approx(8 / 20)           # zero-variance groups / all groups
    assert row["stale"] == pytest.approx(2 / 20) and row["gen_s"] == 4.0
    assert (row["initial_accuracy"], row["accuracy"]) == (0.3, 0.8)


def test_ratio_lines_against_dynamic_sampling(tmp_path):
    ds = rollout_efficiency.summarize(write_run(tmp_path / "ds", "dynamic_sampling", [(5, 5, 0)] * 4), 100.0)
    gr = rollout_efficiency.summarize(write_run(tmp_path / "gr", "greso", [(1, 5, 8)] * 2), 60.0)
    gr["accuracy"] = 0.77
    lines = rollout_efficiency.ratios([ds, gr])
    assert lines == ["greso vs dynamic_sampling: rollouts x0.50 (x0.55 with probes), generation time x0.50, "
                     "wall-clock x0.60, accuracy -3.0 pts"]
    table = rollout_efficiency.table([ds, gr])
    assert "dynamic_sampling" in table and "greso" in table and "0.770" in table


def test_async_row_idle_fractions(tmp_path):
    row = async_vs_sync.summarize(write_run(tmp_path / "s0", "greso", [(0, 10, 0)] * 3), 0, generators=2)
    assert row["step_s"] == 4.0
    assert row["learner_idle"] == pytest.approx((1 + 2 + 3) / 12)
    assert row["generator_idle"] == pytest.approx(1 - 6 / (2 * 12))
    assert "x1.00" in async_vs_sync.table([row, row])
