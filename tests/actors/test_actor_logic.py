"""Actor classes instantiated directly, no Ray: the selector, rewarder and learner logic."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.learner import Learner
from actors.rewarder import Rewarder
from actors.selector import PromptSelector
from pipeline.types import RolloutGroup, Sample
from tests.actors.helpers import tiny_cfg


class ListQueue(list):
    def put_nowait(self, item):
        self.append(item)


class Rollouts:
    def __init__(self, groups):
        self.groups, self.gen_seconds, self.tokens, self.sync_seconds = tuple(groups), 0.1, 0, 0.0


def answer(prompt, right: bool) -> Sample:
    """A sample whose text tiny_score grades right or wrong."""
    digits = f"{int(prompt.ground_truth):04d}"[::-1] if right else "9999"
    return Sample((5, 6, 7, 8, 2), digits, (-0.5,) * 5, True)


def roll(req, version: int, right_pattern) -> list[RolloutGroup]:
    return [RolloutGroup(t, p, tuple(answer(p, ok) for ok in right_pattern(i)), version)
            for i, (t, p) in enumerate(zip(req.tickets, req.prompts))]


def test_selector_issues_what_staleness_allows_then_settles(random_world):
    cfg = tiny_cfg("pipeline.max_staleness=0", "selector.name=none")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    sel.pump()
    assert sum(len(r.prompts) for r in q) == 4          # none: exactly one batch (B=4) at version 0
    sel.pump()
    assert sum(len(r.prompts) for r in q) == 4          # nothing more until the learner moves
    assert all(r.min_version == 0 for r in q)


def test_rewarder_feeds_selector_and_cuts_exact_batches(random_world):
    cfg = tiny_cfg("selector.name=greso")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    rew = Rewarder(cfg, selector=sel)
    sel.pump()
    batches = []
    for req in q:   # alternate mixed, all-right and all-wrong groups
        groups = roll(req, 0, lambda i: [True, False, True, False] if i % 3 == 0 else [i % 3 == 1] * 4)
        batches += rew.consume(Rollouts(groups), rew.grade(groups))
    m = sel.ledger.metrics()
    assert all(len(b.groups) == 4 and not any(g.zero_variance for g in b.groups) for b in batches)
    assert m["ledger/issued"] == sum(v for k, v in m.items() if k != "ledger/issued")
    assert m["ledger/filtered"] > 0 and m["ledger/in_flight"] == 4 * len(batches)
    assert sel.selector.history[q[0].prompts[1].uid].streak_kind == "easy"


def test_greso_skips_prompts_with_history(random_world):
    cfg = tiny_cfg("selector.name=greso", "selector.p_easy=0.05", "selector.p_hard=0.05", "data.tiny.num_train=8")
    sel = PromptSelector(cfg, random_world.train[:8], ListQueue())
    for p in random_world.train[:6]:
        for _ in range(3):
            sel.selector.observe(p.uid, [1.0] * 4)
    sel.pump()
    assert sel.window["skipped_easy"] > 0 and sel.window["skipped_hard"] == 0


def test_learner_step_trains_and_drops_stale(random_world):
    cfg = tiny_cfg("pipeline.max_staleness=0")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(random_world.model_dir))
    learner = Learner(cfg, model, pad_id=0)
    learner.version = 3
    p = random_world.train[:3]
    groups = [RolloutGroup(i, p[i], (answer(p[i], True), answer(p[i], False)), version)
              for i, version in enumerate([3, 3, 2])]
    from pipeline.types import ScoredGroup, TrainBatch
    batch = TrainBatch(4, tuple(ScoredGroup(g, (1.0, 0.0)) for g in groups))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics, trained, stale = learner.step(batch)
    assert trained == [0, 1] and stale == [2] and learner.version == 4
    assert metrics["train/dropped_stale"] == 1 and metrics["train/effective_groups"] == 2
    assert metrics["staleness/max"] == 0 and metrics["train/grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
