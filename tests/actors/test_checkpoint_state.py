"""The pipeline's share of a checkpoint: selector, cursor, ledger and carried groups, no Ray.

State goes through a JSON file as the learner writes pipeline.json; what comes back must be
the same state and make the same next decisions, and a restore re-issues exactly the lost work.
"""
from __future__ import annotations

import json

import pytest

from actors.rewarder import Rewarder
from actors.selector import PromptSelector
from tests.actors.helpers import tiny_cfg
from tests.actors.test_actor_logic import ListQueue, Rollouts, roll


@pytest.mark.parametrize("name", ["greso", "mopps", "dynamic_sampling", "none"])
def test_pipeline_state_round_trips_through_the_checkpoint_file(random_world, tmp_path, name):
    cfg = tiny_cfg(f"selector.name={name}", "selector.probe_fraction=0.5")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    rew = Rewarder(cfg, selector=sel)
    for step in range(1, 4):             # history, controller moves, probes, carried surplus
        sel.pump()
        reqs, q[:] = list(q), []
        for i, req in enumerate(reqs[:-1]):            # the last request stays in flight
            groups = roll(req, step - 1, lambda j: [True, False, True, True] if (i + j) % 3 else [j % 2 == 0] * 4)
            rew.consume(Rollouts(groups), rew.grade(groups))
        sel.settle(step, [], [])
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(rew.checkpoint_state()))
    saved = json.loads(path.read_text())

    sel2, rew2 = PromptSelector(cfg, random_world.train, ListQueue()), Rewarder(cfg)
    sel2.load_state_dict(saved["selector"])
    rew2.restore(saved["carried"], version=3)
    assert json.loads(json.dumps(sel2.state_dict())) == saved["selector"]
    assert list(rew2.acc.waiting) == list(rew.acc.waiting) and rew2.acc.batches_emitted == 3
    assert sel2.ledger.metrics() == sel.ledger.metrics()
    # the same next decisions: what is skipped, kept and issued next, ticket for ticket
    sel.pump(), sel2.pump()
    assert sel2.prompt_q == sel.prompt_q and sel2.window == sel.window


def test_restore_reissues_lost_work_and_keeps_the_ledger_balanced(random_world):
    cfg = tiny_cfg("selector.name=greso", "selector.probe_fraction=0")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    rew = Rewarder(cfg, selector=sel)
    sel.pump()
    assert len(q) > 1
    groups = roll(q[0], 0, lambda j: [True, False, False, True] if j % 2 == 0 else [True] * 4)
    rew.consume(Rollouts(groups), rew.grade(groups))       # half a batch carried, the rest still out
    state = json.loads(json.dumps(rew.checkpoint_state()))
    lost = sel.ledger.live("rollout", "queued")
    carried = sel.ledger.live("carried")
    assert lost and carried

    q2 = ListQueue()
    sel2 = PromptSelector(cfg, random_world.train, q2)
    sel2.restore(state["selector"])
    m = sel2.ledger.metrics()
    assert m["ledger/reissued"] == len(lost) and m["ledger/in_flight"] == 0
    assert m["ledger/issued"] == sum(v for k, v in m.items() if k != "ledger/issued")
    sel2.pump()                           # the lost prompts go out first, under new tickets
    again = [p.uid for r in q2 for p in r.prompts][:len(lost)]
    assert sorted(again) == sorted(sel.uids[sel.ledger.prompt[t]] for t in lost)
    assert min(t for r in q2 for t in r.tickets) == sel.ledger.next_ticket
