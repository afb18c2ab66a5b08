"""Placement on GPU clusters: the learner packed on one node, generators elsewhere, no sharing."""
from __future__ import annotations

import pytest

from pipeline.placement import Node, generator_env, plan

TWO_BY_EIGHT = [Node("node-a", 8), Node("node-b", 8)]


def test_two_nodes_of_eight_give_the_learner_one_and_the_generators_the_other():
    p = plan(TWO_BY_EIGHT, generators=8, gen_gpus=1, workers=8, worker_gpus=1, use_gpu=True)
    assert p.learner_strategy() == "STRICT_PACK"
    assert p.learner_node in ("node-a", "node-b")
    assert set(p.generator_nodes) == {"node-a", "node-b"} - {p.learner_node}
    assert len(p.generator_nodes) == 8


def test_generators_use_the_learner_node_only_for_gpus_it_left_free():
    p = plan(TWO_BY_EIGHT, generators=10, gen_gpus=1, workers=6, worker_gpus=1, use_gpu=True)
    other = ({"node-a", "node-b"} - {p.learner_node}).pop()
    assert p.generator_nodes.count(other) == 8 and p.generator_nodes.count(p.learner_node) == 2
    with pytest.raises(ValueError, match="do not fit 16 GPUs on 2 nodes without sharing"):
        plan(TWO_BY_EIGHT, generators=11, gen_gpus=1, workers=6, worker_gpus=1, use_gpu=True)


def test_tensor_parallel_generators_fit_whole_engines_per_node():
    nodes = [Node("a", 8), Node("b", 8), Node("c", 4)]
    p = plan(nodes, generators=3, gen_gpus=4, workers=8, worker_gpus=1, use_gpu=True)
    assert p.learner_node in ("a", "b")
    assert sorted(p.generator_nodes) == sorted([({"a", "b"} - {p.learner_node}).pop()] * 2 + ["c"])


def test_a_learner_larger_than_any_node_is_spread_by_ray():
    p = plan(TWO_BY_EIGHT, generators=2, gen_gpus=1, workers=12, worker_gpus=1, use_gpu=True)
    assert p.learner_node is None and p.learner_strategy() == "PACK"


def test_fractional_gpus_and_cpu_runs_are_left_to_ray():
    for kwargs in (dict(gen_gpus=0.5, worker_gpus=0.5, use_gpu=True), dict(gen_gpus=1, worker_gpus=0.5, use_gpu=True),
                   dict(gen_gpus=0, worker_gpus=1, use_gpu=False)):
        p = plan(TWO_BY_EIGHT, generators=2, workers=1, **kwargs)
        assert p.learner_node is None and p.generator_nodes == [None, None]


def test_a_generator_without_gpus_sees_none():
    assert generator_env(0) == {"CUDA_VISIBLE_DEVICES": ""}
    assert generator_env(1) == {}
