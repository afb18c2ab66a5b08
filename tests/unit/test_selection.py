"""The GRESO rule, its controller, adaptive sizing and the baselines (no Ray)."""
import math
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.config import SelectorSection
from pipeline.selection import (EASY, HARD, MIXED, DataCursor, DynamicSampling, Greso, PromptHistory, Selector,
                                adaptive_size, classify, make_selector, pick, skip_probability)


def greso(**kw) -> Greso:
    cfg = OmegaConf.structured(SelectorSection(**kw))
    return make_selector(cfg, batch_size=8, sampling_batch=64, seed=0)


def test_classify():
    assert classify([1, 1, 1]) == EASY and classify([0, 0]) == HARD and classify([0, 1]) == MIXED


@pytest.mark.parametrize("streak,p,expected", [(0, 0.5, 0.0), (1, 0.5, 0.5), (2, 0.5, 0.75),
                                               (3, 0.9, 1 - 0.729), (10, 0.5, 0.99), (100, 0.95, 0.99)])
def test_skip_probability_known_streaks(streak, p, expected):
    assert skip_probability(streak, p) == pytest.approx(expected)


def test_history_streak_counts_consecutive_same_kind():
    h = PromptHistory()
    for rewards, (kind, streak) in [([1, 1], (EASY, 1)), ([1, 1], (EASY, 2)), ([0, 0], (HARD, 1)),
                                    ([0, 1], (MIXED, 0)), ([0, 0], (HARD, 1)), ([0, 0], (HARD, 2))]:
        h.update(rewards)
        assert (h.streak_kind, h.streak) == (kind, streak)
    assert h.groups == 6 and h.solved == pytest.approx(2.5)


def test_prompt_without_streak_is_always_kept():
    g = greso()
    g.observe("a", [0, 1, 1, 0])
    assert all(g.keep("a")[0] for _ in range(200)) and all(g.keep("unseen")[0] for _ in range(200))


@pytest.mark.parametrize("kind,rewards,streak", [(EASY, [1] * 4, 1), (EASY, [1] * 4, 3), (HARD, [0] * 4, 2)])
def test_observed_skip_rate_matches_rule(kind, rewards, streak):
    g = greso(p_easy=0.6, p_hard=0.3)
    for _ in range(streak):
        g.observe("x", rewards)
    trials = 20_000
    skips = [g.keep("x") for _ in range(trials)]
    rate = sum(not ok for ok, _ in skips) / trials
    expected = 1 - max(g.p[kind] ** streak, 0.01)
    # binomial standard error, 5 sigma
    assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / trials) + 1e-9
    assert {why for ok, why in skips if not ok} == {kind}


def test_controller_moves_toward_targets_from_both_sides():
    g = greso(alpha=0.3, p_easy=0.5, p_hard=0.5)   # targets: easy 0.1, hard 0.2
    g.end_step(easy_ratio=0.5, hard_ratio=0.05)     # too many easy, too few hard
    assert g.p[EASY] == pytest.approx(0.49) and g.p[HARD] == pytest.approx(0.51)
    g.end_step(easy_ratio=0.0, hard_ratio=0.9)
    assert g.p[EASY] == pytest.approx(0.50) and g.p[HARD] == pytest.approx(0.50)


def test_controller_respects_bounds():
    g = greso(p_easy=0.06, p_hard=0.94)
    for _ in range(50):
        g.end_step(easy_ratio=1.0, hard_ratio=0.0)
    assert g.p[EASY] == pytest.approx(0.05) and g.p[HARD] == pytest.approx(0.95)


@pytest.mark.parametrize("missing,zvr,expected", [(10, 0.0, 13), (10, 0.5, 25), (32, 0.75, 160), (0, 0.5, 0)])
def test_adaptive_size_formula(missing, zvr, expected):
    assert adaptive_size(missing, zvr) == expected
    assert adaptive_size(missing, zvr, hi=20) == min(expected, 20)


def test_sampling_sizes_per_selector():
    cfg = OmegaConf.structured(SelectorSection())
    kw = dict(batch_size=8, sampling_batch=64)
    assert Selector(cfg, **kw).sampling_size(5, 0.9) == 5                 # plain GRPO: exactly what is missing
    assert DynamicSampling(cfg, **kw).sampling_size(5, 0.9) == 64         # DAPO: a fixed sampling batch
    assert Greso(cfg, **kw).sampling_size(5, 0.5) == 13                   # adaptive
    assert Greso(cfg, **kw).sampling_size(50, 0.9) == 64                  # capped by the sampling batch
    assert not Selector(cfg, **kw).post_filter and DynamicSampling(cfg, **kw).post_filter


def test_state_round_trips_through_plain_dict():
    g = greso()
    for i in range(20):
        g.observe(f"p{i}", [i % 3 == 0] * 4)
    g.end_step(0.9, 0.0)
    state = g.state_dict()
    h = greso()
    h.load_state_dict(eval(repr(state), {"array": np.array}))  # plain values only
    assert h.p == g.p and h.history == g.history
    assert [h.keep(f"p{i}") for i in range(20)] == [g.keep(f"p{i}") for i in range(20)]
    with pytest.raises(ValueError, match="selector"):
        Selector(OmegaConf.structured(SelectorSection()), batch_size=1, sampling_batch=1).load_state_dict(state)


def test_cursor_walks_epochs_with_fresh_shuffles_and_restores():
    c = DataCursor(5, seed=3)
    first, second = [c.next() for _ in range(5)], [c.next() for _ in range(5)]
    assert sorted(first) == sorted(second) == list(range(5)) and c.epoch == 1
    resumed = DataCursor.from_state(c.state_dict())
    assert [resumed.next() for _ in range(7)] == [c.next() for _ in range(7)]


def test_pick_counts_every_skip_and_keeps_n():
    g = greso(p_easy=0.05, p_hard=0.05)
    uids = [f"u{i}" for i in range(10)]
    for u in uids[:5]:
        for _ in range(4):
            g.observe(u, [1, 1])
    cursor = DataCursor(10, seed=0)
    picked = pick(g, cursor, uids, 8)
    assert len(picked.indices) == 8
    considered = cursor.epoch * 10 + cursor.position
    assert considered == 8 + picked.skipped[EASY] + picked.skipped[HARD]
    assert picked.skipped[EASY] > 0 and picked.skipped[HARD] == 0


def test_selection_module_does_not_import_ray():
    code = "import sys, pipeline.selection, pipeline.batching; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
