"""The GRESO rule, its controller, adaptive sizing and the baselines (no Ray)."""
import math
import subprocess
from collections import Counter
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.config import SelectorSection
from pipeline.selection import (EASY, HARD, MIXED, BetaPosterior, DataCursor, DynamicSampling, Greso, MoPPS,
                                PromptHistory, Selector, adaptive_size, classify, make_selector, pick,
                                skip_probability)


def greso(**kw) -> Greso:
    cfg = OmegaConf.structured(SelectorSection(**kw))
    return make_selector(cfg, batch_size=8, sampling_batch=64, seed=0)


def mopps(**kw) -> MoPPS:
    return greso(name="mopps", **kw)


def within(rate: float, expected: float, trials: int, sigmas: float = 5) -> bool:
    """Binomial rate within `sigmas` standard errors of `expected`."""
    return abs(rate - expected) <= sigmas * math.sqrt(expected * (1 - expected) / trials) + 1e-9


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
    g.end_step(easy_ratio=0.5, hard_ratio=0.05, epoch=1)     # too many easy, too few hard
    assert g.p[EASY] == pytest.approx(0.49) and g.p[HARD] == pytest.approx(0.51)
    g.end_step(easy_ratio=0.0, hard_ratio=0.9, epoch=1)
    assert g.p[EASY] == pytest.approx(0.50) and g.p[HARD] == pytest.approx(0.50)


def test_controller_respects_bounds():
    g = greso(p_easy=0.06, p_hard=0.94)
    for _ in range(50):
        g.end_step(easy_ratio=1.0, hard_ratio=0.0, epoch=2)
    assert g.p[EASY] == pytest.approx(0.05) and g.p[HARD] == pytest.approx(0.95)


def test_controller_does_not_move_in_epoch_zero():
    g = greso()
    for _ in range(10):                               # no zero-variance groups at all: p would rise
        g.end_step(easy_ratio=0.0, hard_ratio=0.0, epoch=0)
    assert g.p == {EASY: 0.5, HARD: 0.5}
    g.end_step(easy_ratio=0.0, hard_ratio=0.0, epoch=1)
    assert g.p[EASY] == pytest.approx(0.51) and g.p[HARD] == pytest.approx(0.51)


def test_controller_tie_at_target_lowers_p():
    g = greso(alpha=0.3)                               # targets 0.1 and 0.2, exactly hit
    g.end_step(easy_ratio=0.3 / 3, hard_ratio=2 * 0.3 / 3, epoch=1)
    assert g.p[EASY] == pytest.approx(0.49) and g.p[HARD] == pytest.approx(0.49)


@pytest.mark.parametrize("missing,zvr,expected", [
    (3, 0.5, 64),           # int(1.25 * 3 / 0.5) = 7 -> the minimum round, 64
    (100, 0.5, 250),        # int(1.25 * 100 / 0.5)
    (200, 0.2, 312),        # int(1.25 * 200 / 0.8)
    (300, 0.5, 384),        # 750 -> capped by the sampling batch
    (10, 1.0, 384),         # every group zero-variance: infinite estimate -> the cap, no error
    (0, 0.5, 0)])
def test_paper_adaptive_size(missing, zvr, expected):
    assert adaptive_size(missing, zvr, lo=64, hi=384) == expected


def test_paper_rounds_per_selector():
    cfg = OmegaConf.structured(SelectorSection())
    kw = dict(batch_size=256, sampling_batch=384)
    assert Greso(cfg, **kw).sampling_size(256, 0.0, first_round=True) == 384   # first round: the sampling batch
    assert Greso(cfg, **kw).sampling_size(3, 0.5) == 64                        # later: adaptive, at least 64
    assert Greso(cfg, **kw).sampling_size(10, 1.0) == 384                      # bounded at zvr 1
    assert Selector(cfg, **kw).sampling_size(5, 0.9) == 5                      # plain GRPO: exactly what is missing
    assert DynamicSampling(cfg, **kw).sampling_size(5, 0.9) == 384             # DAPO: a fixed sampling batch
    small = OmegaConf.structured(SelectorSection(min_sampling=8))
    assert Greso(small, batch_size=32, sampling_batch=48).sampling_size(3, 0.5) == 8
    assert not Selector(cfg, **kw).post_filter and DynamicSampling(cfg, **kw).post_filter


def test_classify_by_group_mean_with_format_scores():
    fmt = [0.1] * 8
    assert classify([1.0] * 8) == EASY and classify([0.0] * 8) == HARD
    assert classify(fmt) == HARD                                  # boxed but wrong everywhere: hard
    assert classify([0.0, 0.1] * 4) == HARD                       # variance, yet hard (mean 0.05 <= 0.11)
    assert classify([1.0] + [0.1] * 7) == MIXED                   # one right answer: mean 0.2125
    assert classify([1.0] * 7 + [0.1]) == MIXED                   # mean 0.8875 < 0.98
    assert classify([1.0] * 50 + [0.0]) == EASY                   # mean 0.980... >= 0.98
    assert classify([1.0] * 8, easy_min=1.01) == MIXED            # thresholds are the selector's keys
    g = greso(easy_mean_min=0.9, hard_mean_max=0.2)
    g.observe("x", [0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 1.0])      # mean 0.1875 <= 0.2: a hard streak
    assert (g.history["x"].streak_kind, g.history["x"].streak) == (HARD, 1)


def test_state_round_trips_through_plain_dict():
    g = greso()
    for i in range(20):
        g.observe(f"p{i}", [i % 3 == 0] * 4)
    g.end_step(0.9, 0.0, epoch=1)
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


def test_mopps_posterior_counts_successes_and_decays_toward_prior():
    m = mopps()
    m.observe("a", [1, 0, 1, 1])
    m.observe("a", [0, 0, 0, 1])
    assert (m.posterior["a"].a, m.posterior["a"].b) == (1 + 4, 1 + 4)
    p = BetaPosterior(a=11, b=3)
    p.update(successes=2, failures=0, decay=0.5)     # 0.5*11 + 0.5 + 2, 0.5*3 + 0.5 + 0
    assert (p.a, p.b) == (8.0, 2.0)
    q = BetaPosterior(a=50, b=2)
    for _ in range(200):
        q.update(0, 0, decay=0.9)                    # no evidence: forgets back to Beta(1, 1)
    assert q.a == pytest.approx(1) and q.b == pytest.approx(1)


def test_mopps_band_keeps_unseen_prompt_with_probability_band_width():
    m = mopps(mopps_mode="band", mopps_band_low=0.2, mopps_band_high=0.6)
    trials = 20_000
    kept = sum(m.keep("unseen")[0] for _ in range(trials)) / trials
    assert within(kept, 0.4, trials)                 # Beta(1, 1) is uniform: P(0.2 <= θ <= 0.6)


def test_mopps_band_almost_never_keeps_a_prompt_solved_20_of_20():
    m = mopps(mopps_mode="band")
    m.observe("solved", [1] * 20)                    # Beta(21, 1): P(θ <= 0.75) = 0.75^21 = 0.0024
    trials = 20_000
    decisions = [m.keep("solved") for _ in range(trials)]
    assert within(sum(ok for ok, _ in decisions) / trials, 0.75 ** 21, trials)
    assert {why for ok, why in decisions if not ok} == {EASY}


def test_mopps_closest_prefers_uncertain_prompts_over_settled_ones():
    m = mopps(mopps_pool=2.0)
    m.observe("solved", [1] * 20)
    m.observe("hopeless", [0] * 20)
    m.observe("coin", [1, 0] * 4)                    # Beta(5, 5)
    m.observe("coin2", [0, 1] * 3)                   # Beta(4, 4)
    uids = ["solved", "hopeless", "coin", "coin2"]
    picks = {u: 0 for u in uids}
    trials = 5_000
    for _ in range(trials):
        for u, why in zip(uids, m.rank(uids, 2)):
            picks[u] += why is None
    assert picks["solved"] / trials < 0.01 and picks["hopeless"] / trials < 0.01
    assert picks["coin"] / trials > 0.98 and picks["coin2"] / trials > 0.98
    reasons = m.rank(uids, 2)
    assert reasons[0] == EASY and reasons[1] == HARD
    # Against an unseen (uniform) prompt the solved one wins only when the unseen draw lands
    # even further from 0.5: P = E[2(1 - θ)] = 2/22 for θ ~ Beta(21, 1).
    won = sum(m.rank(["solved", "unseen"], 1)[0] is None for _ in range(trials)) / trials
    assert within(won, 2 / 22, trials)


def test_mopps_pick_draws_a_pool_and_keeps_exactly_n():
    m = mopps(mopps_pool=3.0, probe_fraction=0.0)
    uids = [f"u{i}" for i in range(100)]
    cursor = DataCursor(100, seed=1)
    picked = pick(m, cursor, uids, 10)
    assert len(picked.indices) == 10 and sum(picked.skipped.values()) == 20 and cursor.position == 30


@pytest.mark.parametrize("name", ["greso", "mopps", "dynamic_sampling", "none"])
def test_every_selector_state_round_trips_through_plain_dict(name):
    a, b = greso(name=name), greso(name=name)
    for i in range(30):
        a.observe(f"p{i % 7}", [i % 3 == 0, 1, i % 2 == 0, 1])
    a.end_step(0.3, 0.1, epoch=1)
    b.load_state_dict(eval(repr(a.state_dict()), {"array": np.array}))
    uids = [f"p{i}" for i in range(7)]
    assert [a.keep(u) for u in uids] == [b.keep(u) for u in uids]
    assert pick(a, DataCursor(7), uids, 5) == pick(b, DataCursor(7), uids, 5)


def test_probes_are_a_budgeted_uniform_draw_from_the_skips():
    g = greso(p_easy=0.05, p_hard=0.05, probe_fraction=0.1)
    uids = [f"u{i}" for i in range(200)]
    for u in uids[:150]:
        for _ in range(5):
            g.observe(u, [0, 0])
    cursor, kept, probes = DataCursor(200, seed=0), 0, []
    for _ in range(300):
        picked = pick(g, cursor, uids, 20)
        kept += len(picked.indices)
        probes += picked.probes
        assert len(picked.probes) <= sum(picked.skipped.values())
    assert {why for _, why in probes} == {HARD}
    assert all(i < 150 for i, _ in probes)           # only prompts that could be skipped
    assert within(len(probes) / kept, 0.1, kept)     # budget: a share of the prompts kept, not of the skips
    counts = Counter(i for i, _ in probes)           # uniform over the skippable prompts
    assert max(counts.values()) < 4 * len(probes) / 150
    assert not any(pick(greso(name="dynamic_sampling", probe_fraction=0.5), DataCursor(200), uids, 50).probes
                   for _ in range(3))                # nothing skipped, nothing probed


def test_selection_module_does_not_import_ray():
    code = "import sys, pipeline.selection, pipeline.batching; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
