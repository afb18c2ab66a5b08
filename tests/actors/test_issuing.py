"""How the selector actor issues prompts: the paper's rounds and lean streaming (no Ray)."""
from __future__ import annotations

import copy
import json

from actors.rewarder import Rewarder
from actors.selector import PromptSelector
from tests.actors.helpers import tiny_cfg
from tests.actors.test_actor_logic import ListQueue, Rollouts, roll

MIXED, WRONG = [True, False, True, False], [False] * 4


def feed(sel, rew, q, version: int, mixed: int) -> list:
    """Roll out every queued request: the first `mixed` groups have a signal, the rest none."""
    batches, seen = [], 0
    while q:
        req = q.pop(0)
        groups = roll(req, version, lambda i, s=seen: MIXED if s + i < mixed else WRONG)
        seen += len(groups)
        batches += rew.consume(Rollouts(groups), rew.grade(groups))
    return batches


def issued(q) -> int:
    return sum(len(r.prompts) for r in q)


def test_paper_sizing_issues_the_authors_rounds(random_world):
    cfg = tiny_cfg("pipeline.max_staleness=0", "selector.sizing=paper", "selector.min_sampling=2",
                   "selector.probe_fraction=0")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    rew = Rewarder(cfg, selector=sel)
    sel.pump()
    assert issued(q) == 8                                 # first round: the sampling batch
    feed(sel, rew, q, 0, mixed=3)                         # 3 of 8 groups kept: 1 missing, zvr 5/8
    sel.pump()
    sel.pump()
    assert issued(q) == 3                                 # int(1.25 * 1 / (3/8)) = 3, one round at a time
    batches = feed(sel, rew, q, 0, mixed=3)               # fills the batch, 2 carried
    sel.pump()
    assert issued(q) == 0 and len(batches) == 1           # synchronous: wait for the learner
    sel.settle(1, [g.group.ticket for g in batches[0].groups], [])
    sel.pump()
    assert issued(q) == 8                                 # the next batch's first round: the sampling batch again


def test_streaming_bounds_in_flight_when_everything_is_zero_variance(random_world):
    cfg = tiny_cfg("pipeline.max_staleness=1", "selector.name=dynamic_sampling", "selector.probe_fraction=0",
                   "trainer.total_steps=100")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    rew = Rewarder(cfg, selector=sel)
    bound = sel.max_in_flight
    assert bound == 2 * 2 * 8
    total = 0
    for _ in range(30):                                   # zvr -> 1: the yield estimate asks for 100x
        sel.pump()
        assert sel.ledger.count["rollout"] <= bound
        assert all(len(r.prompts) >= cfg.rollout.request_size for r in q)
        total += issued(q)
        feed(sel, rew, q, 0, mixed=0)
    assert total <= 30 * bound


def test_streaming_issues_only_what_is_missing(random_world):
    cfg = tiny_cfg("pipeline.max_staleness=1", "selector.name=dynamic_sampling", "selector.probe_fraction=0",
                   "trainer.total_steps=100")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    sel.pump()
    assert issued(q) == 8                                 # two batches of 4 at yield 1 (no history): no x1.25
    assert all(len(r.prompts) == 4 for r in q)


def test_issuing_state_round_trips_to_identical_decisions(random_world):
    cfg = tiny_cfg("pipeline.max_staleness=0", "selector.sizing=paper", "selector.min_sampling=2")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    rew = Rewarder(cfg, selector=sel)
    sel.pump()
    feed(sel, rew, q, 0, mixed=3)
    state = json.loads(json.dumps(sel.state_dict()))      # plain JSON-able values only
    twin = PromptSelector(cfg, random_world.train, ListQueue())
    twin.load_state_dict(copy.deepcopy(state))
    assert twin.round == sel.round and list(twin.recent_zv) == list(sel.recent_zv)
    sel.pump()
    twin.pump()
    assert [r.tickets for r in twin.prompt_q] == [r.tickets for r in q]
    assert [[p.uid for p in r.prompts] for r in twin.prompt_q] == [[p.uid for p in r.prompts] for r in q]
