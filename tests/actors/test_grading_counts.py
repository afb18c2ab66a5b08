"""Grading timeouts and errors reach the selector's per-step metrics (Rewarder -> selector.report), no Ray."""
from __future__ import annotations

from actors.rewarder import Rewarder
from actors.selector import PromptSelector
from pipeline.types import RolloutGroup, Sample
from tests.actors.helpers import tiny_cfg
from tests.actors.test_actor_logic import ListQueue, Rollouts

STALL = r"\boxed{9^{9^{9^{9}}}}"


def test_timeouts_and_errors_land_in_the_step_snapshot(random_world):
    cfg = tiny_cfg("selector.name=none", "reward.timeout_s=1", "reward.num_threads=2")
    cfg.reward.kind = "math"   # the tiny world's prompts, graded by math-verify (the config pairs tiny with tiny)
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    rew = Rewarder(cfg, selector=sel)
    try:
        sel.pump()
        req = q[0]
        truth = req.prompts[0].ground_truth
        texts = [STALL, None, rf"\boxed{{{truth}}}", "no answer"]   # a stall, a non-text output (engine bug)
        groups = [RolloutGroup(req.tickets[0], req.prompts[0],
                               tuple(Sample((5,), t, (-0.5,), True) for t in texts), 0)]
        scored = rew.grade(groups)
        assert scored[0].rewards == (0.0, 0.0, 1.0, 0.0)
        rew.consume(Rollouts(groups), scored)
        snap = sel.settle(1, [], [])
        assert (snap["reward/timeouts"], snap["reward/errors"]) == (1, 1)
        rew.consume(Rollouts([]), [])                 # nothing new since: the next window starts at 0
        snap = sel.settle(2, [], [])
        assert (snap["reward/timeouts"], snap["reward/errors"]) == (0, 0)
    finally:
        rew.score.close()


def test_the_tiny_scorer_reports_zero_counts(random_world):
    cfg = tiny_cfg("selector.name=none")
    rew = Rewarder(cfg)
    assert rew.grading_counts() == {"reward/timeouts": 0, "reward/errors": 0}
