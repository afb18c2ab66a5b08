"""Dynamic-sampling accumulator, staleness rule, ledger and rollout demand (no Ray)."""
import random

import pytest

from pipeline.batching import Accumulator, Ledger, LedgerError, is_stale, rollout_demand, staleness
from pipeline.types import Prompt, RolloutGroup, Sample, ScoredGroup


def scored(ticket: int, rewards, version: int = 0, probe: bool = False) -> ScoredGroup:
    s = Sample((1,), "x", (0.0,), True)
    return ScoredGroup(RolloutGroup(ticket, Prompt(f"u{ticket}", (1,), "1"), (s,) * len(rewards), version, probe),
                       tuple(rewards))


def test_staleness_rule():
    assert staleness(3, 5) == 2
    assert not is_stale(4, 5, 1) and is_stale(3, 5, 1) and not is_stale(5, 5, 0) and is_stale(4, 5, 0)


def test_accumulator_never_loses_or_duplicates_a_group():
    rng = random.Random(0)
    acc = Accumulator(batch_size=4)
    fates, emitted = {}, []
    for t in range(203):
        g = scored(t, [rng.random() < 0.5 for _ in range(4)])
        fates[t] = acc.add(g)
        while (b := acc.pop_batch()) is not None:
            assert len(b) == 4 and not any(x.zero_variance for x in b)
            emitted += [x.group.ticket for x in b]
    waiting = [g.group.ticket for g in acc.waiting]
    filtered = [t for t, f in fates.items() if f == "filtered"]
    assert len(emitted) == len(set(emitted))
    assert sorted(emitted + waiting + filtered) == list(range(203))
    assert len(waiting) < 4 and filtered


def test_accumulator_drops_zero_variance_only_with_post_filter():
    acc = Accumulator(2)
    assert [acc.add(scored(0, [1, 1])), acc.add(scored(1, [0, 0])), acc.add(scored(2, [0, 1]))] == \
        ["filtered", "filtered", "carried"]
    keep_all = Accumulator(2, post_filter=False)
    assert keep_all.add(scored(0, [1, 1])) == "carried"
    assert Accumulator(2).add(scored(9, [0, 1], probe=True)) == "probed"


def test_surplus_is_carried_to_next_batch_in_order():
    acc = Accumulator(3)
    for t in range(5):
        acc.add(scored(t, [0, 1]))
    assert [g.group.ticket for g in acc.pop_batch()] == [0, 1, 2]
    assert acc.pop_batch() is None and [g.group.ticket for g in acc.waiting] == [3, 4]
    acc.add(scored(5, [1, 0]))
    assert [g.group.ticket for g in acc.pop_batch()] == [3, 4, 5]


def test_drop_stale_uses_the_version_that_will_consume_the_batch():
    acc = Accumulator(1)
    acc.add(scored(0, [0, 1], version=0))
    acc.pop_batch()                            # batch 1 trains at version 0
    acc.add(scored(1, [0, 1], version=0))      # would train at version 1: lag 1
    acc.add(scored(2, [0, 1], version=1))
    assert acc.drop_stale(max_staleness=1) == []
    assert [g.group.ticket for g in acc.drop_stale(max_staleness=0)] == [1]
    assert [g.group.ticket for g in acc.waiting] == [2]


def test_ledger_accounts_every_ticket_exactly_once():
    led = Ledger()
    t = led.issue(10)
    led.move(t[:3], "filtered")
    led.move(t[3:8], "carried")
    led.move(t[3:6], "queued")
    led.move(t[6:7], "dropped_stale")
    led.move(t[3:5], "trained")
    led.move(t[5:6], "dropped_stale")
    m = led.metrics()
    assert m == {"ledger/issued": 10, "ledger/trained": 2, "ledger/filtered": 3, "ledger/dropped_stale": 2,
                 "ledger/carried": 1, "ledger/in_flight": 2, "ledger/reissued": 0}
    assert m["ledger/issued"] == sum(v for k, v in m.items() if k != "ledger/issued")


def test_ledger_reissues_lost_work_by_prompt():
    """A stop or a dead actor: tickets in rollout or queued retire as `reissued` and hand back
    their prompts; carried ones (restored elsewhere) and final ones are untouched."""
    led = Ledger()
    t = led.issue(6, prompts=[10, 11, 12, 13, 14, 15])
    led.move(t[:2], "carried")
    led.move(t[:1], "queued")
    led.move(t[2:3], "filtered")
    lost = led.live("rollout", "queued")
    assert lost == [t[0], t[3], t[4], t[5]]
    assert led.reissue(lost) == [10, 13, 14, 15]
    m = led.metrics()
    assert m["ledger/reissued"] == 4 and m["ledger/in_flight"] == 0 and m["ledger/carried"] == 1
    assert m["ledger/issued"] == sum(v for k, v in m.items() if k != "ledger/issued")
    assert led.prompt == {t[1]: 11}             # only live tickets remember their prompt
    with pytest.raises(LedgerError):
        led.reissue([t[1]])                      # carried groups are restored, never re-issued


@pytest.mark.parametrize("src,to", [("trained", "trained"), ("rollout", "trained"), ("filtered", "carried")])
def test_ledger_refuses_illegal_moves(src, to):
    led = Ledger()
    t = led.issue(1)
    path = {"rollout": [], "trained": ["carried", "queued", "trained"], "filtered": ["filtered"]}[src]
    for state in path:
        led.move(t, state)
    with pytest.raises(LedgerError):
        led.move(t, to)
    with pytest.raises(LedgerError):
        led.move([99], "carried")


def test_ledger_state_round_trip():
    led = Ledger()
    led.move(led.issue(4)[:2], "carried")
    other = Ledger()
    other.load_state_dict(led.state_dict())
    assert other.metrics() == led.metrics() and other.issue(1) == [4]


def test_probes_are_reported_apart():
    led = Ledger()
    t = led.issue(3)
    led.move(t[:1], "probed")
    m = led.metrics()
    assert m["ledger/issued"] == 2 and m["ledger/in_flight"] == 2


@pytest.mark.parametrize("kw,expected", [
    (dict(steps_allowed=2, batch_size=8, groups_committed=0, prompts_in_rollout=0, yield_rate=1.0), 16),
    (dict(steps_allowed=2, batch_size=8, groups_committed=8, prompts_in_rollout=4, yield_rate=0.5), 6),
    (dict(steps_allowed=1, batch_size=8, groups_committed=8, prompts_in_rollout=10, yield_rate=0.5), 0),
])
def test_rollout_demand(kw, expected):
    assert rollout_demand(**kw) == expected


def test_streaming_size_issues_what_is_missing_in_request_units():
    from pipeline.batching import streaming_size
    kw = dict(request_size=16, max_in_flight=200)
    assert streaming_size(32, 0.5, in_rollout=0, **kw) == 56            # aims 1 sd (4 groups) below the need
    assert streaming_size(32, 1.0, in_rollout=0, **kw) == 32            # certain yield: exactly the need
    assert streaming_size(8, 0.5, in_rollout=0, **kw) == 16             # margin below one request: the need itself
    assert streaming_size(3, 0.5, in_rollout=20, urgent=True, **kw) == 0  # small need: wait for results in flight
    assert streaming_size(3, 0.5, in_rollout=0, urgent=True, **kw) == 4   # the learner's next batch: below the need
    assert streaming_size(1, 0.5, in_rollout=0, urgent=True, **kw) == 1   # ... yet always one prompt at least
    assert streaming_size(3, 0.5, in_rollout=0, **kw) == 0              # a later batch: ride the next full request
    assert streaming_size(3, 0.5, in_rollout=0, ending=True, **kw) == 6  # the run's last batch: exactly
    assert streaming_size(32, 0.0, in_rollout=150, **kw) == 50          # zvr 1: bounded by what may be in flight
    assert streaming_size(32, 0.5, in_rollout=200, **kw) == 0
    assert streaming_size(0, 0.5, in_rollout=0, **kw) == 0


def test_streaming_top_ups_rarely_overshoot_and_always_progress():
    """A top-up's surplus is generated at the newest version and still expires: it aims below the
    need, so a second small top-up follows more often and the expected surplus stays a fraction
    of a group (asking for need / yield exactly gave up to 0.9 surplus groups per top-up)."""
    from math import ceil, comb

    from pipeline.batching import streaming_size

    def surplus(n, y, missing):   # E[max(0, Binomial(n, y) - missing)]
        return sum(comb(n, k) * y ** k * (1 - y) ** (n - k) * max(0, k - missing) for k in range(n + 1))

    exact = []
    for missing in range(1, 16):
        for y in (0.3, 0.5, 0.7, 0.9, 0.95):
            n = streaming_size(missing, y, request_size=16, in_rollout=0, max_in_flight=500, urgent=True)
            if n >= 16:
                continue   # a full request: the first-issue rule, not a top-up
            assert 1 <= n <= ceil(missing / y)
            assert surplus(n, y, missing) < 0.3, (missing, y, n)
            exact.append(surplus(ceil(missing / y - 1e-9), y, missing))
    assert max(exact) > 0.6      # what the margin saves


def test_request_sizes_never_below_request_size():
    from pipeline.batching import request_sizes
    assert request_sizes(64, 16) == [16] * 4
    assert request_sizes(40, 16) == [20, 20]
    assert request_sizes(100, 32) == [34, 33, 33]
    assert request_sizes(6, 16) == [6] and request_sizes(0, 16) == []
    for n in range(1, 200):
        sizes = request_sizes(n, 16)
        assert sum(sizes) == n and (min(sizes) >= 16 or len(sizes) == 1)
