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
    probes = req.probe or (False,) * len(req.prompts)
    return [RolloutGroup(t, p, tuple(answer(p, ok) for ok in right_pattern(i)), version, probe)
            for i, (t, p, probe) in enumerate(zip(req.tickets, req.prompts, probes))]


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


def test_probes_measure_false_skips_and_are_never_trained(random_world):
    """Prompts with an all-wrong history are skipped; probes among them come back mixed
    (false skips), feed history, stay out of batches and out of rollout/samples."""
    cfg = tiny_cfg("selector.name=greso", "selector.p_hard=0.05", "selector.probe_fraction=0.5")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    rew = Rewarder(cfg, selector=sel)
    hard = {p.uid for p in random_world.train[: len(random_world.train) // 2]}
    for uid in hard:
        for _ in range(4):
            sel.selector.observe(uid, [0.0] * 4)
    sel.pump()
    probe_uids = [p.uid for r in q for p, probe in zip(r.prompts, r.probe) if probe]
    assert probe_uids and set(probe_uids) <= hard
    batches = []
    for req in q:   # everything rolled out has a learning signal
        groups = roll(req, 0, lambda i: [True, False, False, True])
        batches += rew.consume(Rollouts(groups), rew.grade(groups))
    trained = [g.group.ticket for b in batches for g in b.groups]
    assert trained and not any(g.group.probe for b in batches for g in b.groups)
    row = sel.settle(1, trained[:4], [])
    assert row["selector/probes"] == len(probe_uids) and row["selector/false_skip_rate"] == 1.0
    assert row["selector/false_skip_rate_hard"] == 1.0 and row["selector/false_skip_rate_easy"] is None
    assert row["rollout/probe_samples"] == 4 * len(probe_uids)
    assert row["rollout/samples"] == 4 * row["rollout/prompts"]         # probes counted apart
    assert row["ledger/issued"] == sum(v for k, v in row.items() if k.startswith("ledger/") and k != "ledger/issued")
    assert all(sel.selector.history[u].groups == 5 for u in probe_uids)  # fed back to history
    # the kept prompts had no history when issued, so the bias metrics have nothing yet
    assert row["rollout/difficulty_mean"] is None and row["train/difficulty_mean"] is None


def test_difficulty_means_compare_rolled_out_and_trained_prompts(random_world):
    """Dynamic sampling rolls out solved and unsolved prompts alike but trains only on the
    mixed ones (here all at solve rate 1/3): the two means differ the way the filter tilts them."""
    cfg = tiny_cfg("selector.name=dynamic_sampling", "pipeline.max_staleness=0")
    q = ListQueue()
    sel = PromptSelector(cfg, random_world.train, q)
    rew = Rewarder(cfg, selector=sel)
    issued = []
    rate = {p.uid: [0, 1 / 3, 1, 1][i % 4] for i, p in enumerate(random_world.train)}
    for uid, r in rate.items():
        sel.selector.observe(uid, [1.0] * round(3 * r) + [0.0] * (3 - round(3 * r)))
    batches = []
    while not batches:   # outcome follows the history: rates 0 and 1 stay zero-variance
        sel.pump()
        while q:
            req = q.pop(0)
            groups = roll(req, 0, lambda i, req=req: [j < round(4 * rate[req.prompts[i].uid]) for j in range(4)])
            batches += rew.consume(Rollouts(groups), rew.grade(groups))
            issued += [rate[p.uid] for p in req.prompts]
    trained = [g.group.ticket for g in batches[0].groups]
    row = sel.settle(1, trained, [])
    assert row["rollout/difficulty_mean"] == pytest.approx(sum(issued) / len(issued))
    assert row["rollout/difficulty_mean"] > 0.5 and row["train/difficulty_mean"] == pytest.approx(1 / 3)


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


class TakeQueue(ListQueue):
    """The prompt queue as the selector's take() reads it."""

    def get_nowait(self):
        from queue import Empty
        if not self:
            raise Empty
        return self.pop(0)

    def get(self, timeout=None):
        return self.get_nowait()


def test_take_reissues_what_a_dead_incarnation_of_the_taker_still_held(random_world):
    """A generator asks again only after it let go of its last request; if its slot still holds
    tickets, the asker is a restarted generator whose predecessor died holding them (its take
    returned after it was counted lost), so they are issued again rather than lost forever."""
    cfg = tiny_cfg("selector.name=none")
    sel = PromptSelector(cfg, random_world.train, TakeQueue())
    sel.pump()
    held = sel.take(0, wait_s=0.1)
    assert sel.held[0] == held.tickets
    again = sel.take(0, wait_s=0.1)           # no holding(()) in between: the first taker died
    m = sel.ledger.metrics()
    assert again.tickets != held.tickets and sel.held[0] == again.tickets
    assert m["ledger/reissued"] == len(held.tickets)
    assert sorted(i for i, _ in sel.reissue) == sorted(sel.uids.index(p.uid) for p in held.prompts)
    sel.holding(0, ())
    sel.take(0)                               # a clean hand-back reissues nothing
    assert sel.ledger.metrics()["ledger/reissued"] == len(held.tickets)
