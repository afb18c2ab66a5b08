"""Evaluation paths of the generator and rewarder, instantiated directly (no Ray)."""
from __future__ import annotations

from actors.generator import Generator
from actors.rewarder import Rewarder
from tests.actors.helpers import tiny_cfg


def test_generator_samples_k_per_prompt_reproducibly_and_greedy_by_default(random_world):
    gen = Generator(tiny_cfg(), str(random_world.model_dir), str(random_world.tokenizer_dir), store=None)
    prompts = random_world.eval[:8]
    _, greedy = gen.evaluate(prompts, 5)
    _, again = gen.evaluate(prompts, 5)
    _, sampled = gen.evaluate(prompts, 5, k=3)
    _, resampled = gen.evaluate(prompts, 5, k=3)
    assert len(greedy) == 8 and greedy == again
    assert len(sampled) == 24 and sampled == resampled                  # seeded by (seed, generator, version)
    assert sampled != [t for t in greedy for _ in range(3)]             # temperature 1 on a random model


def test_rewarder_grades_each_eval_set_with_its_own_kind(random_world):
    rew = Rewarder(tiny_cfg())                                          # reward.kind = tiny
    texts, truths = ["\\boxed{579}", "9750"], ["579", "579"]
    assert rew.accuracy(texts, truths) == 0.5                           # tiny: "9750" reversed is 579
    assert rew.accuracy(texts, truths, "math") == 0.5                   # math-verify: only the boxed one
    assert rew.accuracy(texts[:1], truths[:1], "math") == 1.0 and rew.accuracy(texts[:1], truths[:1]) == 0.0
    assert set(rew.scorers) == {"tiny", "math"}                         # built once, then reused
