"""Small builders shared by the actor tests."""
from __future__ import annotations

from pipeline.config import load_config


def tiny_cfg(*overrides: str):
    """conf=tiny with test-sized batches."""
    return load_config(["conf=tiny", "train.batch_size=4", "rollout.sampling_batch=8", "rollout.request_size=4",
                        "rollout.n=4", *overrides])
