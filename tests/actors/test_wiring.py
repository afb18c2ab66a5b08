"""Real Ray: actors on real queues, weight publication and staleness accounting."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import ray
import torch
from ray.util.queue import Queue
from transformers import AutoModelForCausalLM

from actors.generator import Generator
from actors.rewarder import Rewarder
from actors.selector import PromptSelector
from actors.weights import Publisher, WeightStore
from pipeline.engines.base import SamplingConfig
from pipeline.engines.hf import HFEngine
from pipeline.driver import generator_placement
from pipeline.transport import Slot
from tests.actors.helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("ray_session")
FREE = {"num_cpus": 0}


def other_weights(world, seed: int) -> dict:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(world.model_dir))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model.state_dict()


def test_generator_picks_up_published_weights(random_world):
    cfg = tiny_cfg()
    store = ray.remote(WeightStore).options(**FREE).remote()
    gen = ray.remote(Generator).options(num_cpus=0.25, max_concurrency=2).remote(
        cfg, str(random_world.model_dir), str(random_world.tokenizer_dir), store)
    prompts = random_world.eval[:16]
    v0, before = ray.get(gen.evaluate.remote(prompts, 5))
    state = other_weights(random_world, seed=1)
    ray.get(store.publish.remote(1, state))
    assert ray.get(gen.sync_weights.remote()) == 1
    v1, after = ray.get(gen.evaluate.remote(prompts, 5))
    initial = _greedy_texts(random_world, {}, prompts)
    expected = _greedy_texts(random_world, state, prompts)
    assert (v0, v1) == (0, 1) and before == initial and after == expected
    # two random models can both answer "=====" to every prompt (seen once): then there is nothing to tell apart
    assert after != before or expected == initial
    with pytest.raises(ray.exceptions.RayTaskError, match="not newer"):
        ray.get(store.publish.remote(1, state))


def _greedy_texts(world, state, prompts) -> list[str]:
    local = HFEngine(str(world.model_dir), str(world.tokenizer_dir))
    local.update_weights(state)
    return [o[0].text for o in local.generate([p.token_ids for p in prompts],
                                              SamplingConfig(temperature=0, max_new_tokens=5))]


def test_weights_published_through_shared_memory_reach_the_generator(random_world, tmp_path):
    """The learner's Publisher writes a slot; the generator maps it (same node) or, for a
    generator on another node, stages the bytes the object store carried. Pinned versions
    keep their slot while newer ones are written."""
    cfg = tiny_cfg()
    store = ray.remote(WeightStore).options(**FREE).remote()
    gen = ray.remote(Generator).options(num_cpus=0.25, max_concurrency=2).remote(
        cfg, str(random_world.model_dir), str(random_world.tokenizer_dir), store)
    prompts = random_world.eval[:16]
    publisher = Publisher(cfg, store, str(tmp_path))
    try:
        one = other_weights(random_world, seed=1)
        weights = publisher.publish(1, one, pin=True)
        assert isinstance(weights[1], Slot) and weights[2] is None      # nobody asked from another node
        assert ray.get(gen.sync_weights.remote()) == 1
        assert ray.get(gen.evaluate.remote(prompts, 5))[1] == _greedy_texts(random_world, one, prompts)
        for v in (2, 3):                                                 # v1 is pinned: its slot stays
            publisher.publish(v, other_weights(random_world, seed=v))
        assert ray.get(gen.evaluate.remote(prompts, 5, weights))[1] == _greedy_texts(random_world, one, prompts)
        ray.get(store.unpin.remote(1))
        assert ray.get(store.pinned.remote()) == set()
        # a generator on another node cannot map the file: it gets the bytes through the object store
        four = other_weights(random_world, seed=4)
        slot = publisher.writer.write(4, four)
        far = Slot(4, slot.path, slot.nbytes, node="another-node")
        ray.get(store.publish.remote(4, far, [ray.put(np.fromfile(far.path, dtype=np.uint8))]))
        assert ray.get(gen.sync_weights.remote()) == 4
        assert ray.get(gen.evaluate.remote(prompts, 5))[1] == _greedy_texts(random_world, four, prompts)
    finally:
        ray.kill(gen)
        publisher.writer.close()
        shutil.rmtree(publisher.writer.directory, ignore_errors=True)


def test_a_generator_without_gpus_sees_none(random_world):
    """rollout.num_gpus=0: CUDA_VISIBLE_DEVICES="" (Ray would leave the node's GPUs visible)."""
    cfg = tiny_cfg("rollout.num_cpus=0.25")
    gen = ray.remote(Generator).options(**generator_placement(cfg)).remote(
        cfg, str(random_world.model_dir), str(random_world.tokenizer_dir), None)
    try:
        assert ray.get(gen.env.remote("CUDA_VISIBLE_DEVICES")) == ""
    finally:
        ray.kill(gen)


@pytest.fixture
def pipeline():
    """Start selector, generator and rewarder loops on real queues; always tear them down,
    so a failing test cannot leave actors holding the session's 2 CPUs."""
    started = []

    def start(cfg, world):
        qs = [Queue(8, actor_options=FREE), Queue(16, actor_options=FREE), Queue(1, actor_options=FREE)]
        store = ray.remote(WeightStore).options(**FREE).remote()
        sel = ray.remote(PromptSelector).options(num_cpus=0.25, max_concurrency=4).remote(cfg, world.train, qs[0])
        gen = ray.remote(Generator).options(num_cpus=0.25, max_concurrency=4).remote(
            cfg, str(world.model_dir), str(world.tokenizer_dir), store, qs[0], qs[1])
        rew = ray.remote(Rewarder).options(num_cpus=0.25, max_concurrency=4).remote(cfg, sel, qs[1], qs[2])
        loops = [sel.run.remote(), gen.run.remote(), rew.run.remote()]
        started.append(([sel, gen, rew, store] + [q.actor for q in qs], loops))
        return store, sel, qs[2]

    yield start
    for actors, loops in started:
        for a in actors[:3]:
            a.stop.remote()
        ray.wait(loops, num_returns=len(loops), timeout=30)
        for a in actors:
            ray.kill(a)


def test_queues_deliver_exact_batches_and_ledger_balances(random_world, pipeline):
    cfg = tiny_cfg("selector.name=none", "pipeline.max_staleness=0")
    store, sel, train_q = pipeline(cfg, random_world)
    batch = ray.get(train_q.get(timeout=300)[0])
    assert batch.index == 1 and len(batch.groups) == 4
    assert all(len(g.group.samples) == 4 and g.group.version == 0 for g in batch.groups)
    snap = ray.get(sel.settle.remote(1, [g.group.ticket for g in batch.groups], []))
    ledger = {k: v for k, v in snap.items() if k.startswith("ledger/")}
    assert ledger["ledger/trained"] == 4
    assert ledger["ledger/issued"] == sum(v for k, v in ledger.items() if k != "ledger/issued")


def test_synchronous_mode_never_trains_on_old_versions(random_world, pipeline):
    """max_staleness=0: after v1 is published, batch 2 holds only v1 data; older leftovers are dropped."""
    cfg = tiny_cfg("selector.name=none", "pipeline.max_staleness=0")   # a random model solves nothing: no filter
    store, sel, train_q = pipeline(cfg, random_world)
    first = ray.get(train_q.get(timeout=300)[0])
    ray.get(store.publish.remote(1, other_weights(random_world, seed=2)))
    ray.get(sel.settle.remote(1, [g.group.ticket for g in first.groups], []))
    second = ray.get(train_q.get(timeout=300)[0])
    assert {g.group.version for g in second.groups} == {1}
    snap = ray.get(sel.settle.remote(2, [g.group.ticket for g in second.groups], []))
    ledger = {k: v for k, v in snap.items() if k.startswith("ledger/")}
    assert ledger["ledger/issued"] == sum(v for k, v in ledger.items() if k != "ledger/issued")


def test_rewarder_consumes_in_arrival_order_and_raises_what_its_reader_hit(random_world):
    """Grading runs in a pool and a reader thread feeds it: a request graded after a later one
    still reaches its batch first, and an error in the reader ends run() instead of a silent hang."""
    import threading

    from tests.actors.test_actor_logic import ListQueue, Rollouts, roll

    cfg = tiny_cfg("selector.name=none", "reward.num_threads=2")
    sel = PromptSelector(cfg, random_world.train, ListQueue())
    sel.pump()
    first, second = sel.prompt_q[:2]
    rollout_q, train_q = Queue(16, actor_options=FREE), Queue(8, actor_options=FREE)
    rew = Rewarder(cfg, selector=sel, rollout_q=rollout_q, train_q=train_q)
    second_graded, grade = threading.Event(), rew.grade

    def grade_first_last(groups):
        if groups[0].ticket == first.tickets[0]:
            assert second_graded.wait(30), "the second request was never graded"
        out = grade(groups)
        if groups[0].ticket == second.tickets[0]:
            second_graded.set()
        return out

    rew.grade = grade_first_last
    failure = []
    loop = threading.Thread(target=lambda: failure.append(_raised(rew.run)), daemon=True)
    loop.start()
    try:
        for req in (first, second):
            rollout_q.put([ray.put(Rollouts(roll(req, 0, lambda i: [True, False, True, False])))])
        batches = [ray.get(train_q.get(timeout=60)[0]) for _ in range(2)]
        assert [[g.group.ticket for g in b.groups] for b in batches] == [list(first.tickets), list(second.tickets)]
        rollout_q.put(["not an object ref"])
        loop.join(30)
        assert not loop.is_alive() and failure and failure[0] is not None
    finally:
        rew.stop()
        for q in (rollout_q, train_q):
            ray.kill(q.actor)


def _raised(fn):
    try:
        fn()
    except Exception as e:   # noqa: BLE001  (the test inspects it)
        return e
    return None
