"""Shared fixtures: the tiny world (built once per session) and one local Ray session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def random_world(tmp_path_factory):
    """A tiny world with a random-init model: model/tokenizer dirs and prompts in ~1 s."""
    from pipeline.tiny import make_random_world
    return make_random_world(tmp_path_factory.mktemp("worlds"), seed=0)


@pytest.fixture(scope="session")
def tiny_cache():
    """Where the warm-started tiny world is cached (built once, reused by e2e runs)."""
    return os.environ.get("GRESO_TEST_CACHE", os.path.expanduser("~/.cache/greso"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) for the whole test session."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
