"""The messages that flow between actors: the vocabulary of the system.

Every message is a frozen dataclass of plain Python values (lists of ints, floats,
strings), so it pickles cheaply through Ray's object store and means the same thing in
a unit test with no Ray at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation problem, already tokenised with the model's template."""

    uid: str                       # stable id: the same problem gets the same uid across runs
    token_ids: tuple[int, ...]     # prompt tokens fed to the engine (chat template applied)
    ground_truth: str              # reference answer the reward grades against
    text: str = ""                 # rendered prompt, for logs and debugging


@dataclass(frozen=True)
class Request:
    """A chunk of prompts the selector sends to the generator pool."""

    tickets: tuple[int, ...]       # one ledger ticket per prompt (a prompt may be issued twice)
    prompts: tuple[Prompt, ...]
    min_version: int               # generate with policy version >= this (staleness bound)
    probe: tuple[bool, ...] = ()   # prompts rolled out only to measure the skip predictor


@dataclass(frozen=True)
class Sample:
    """One sampled response."""

    token_ids: tuple[int, ...]     # response tokens (EOS included when produced)
    text: str
    logprobs: tuple[float, ...]    # behaviour log-prob of each response token
    finished: bool                 # True if EOS was produced before max_new_tokens


@dataclass(frozen=True)
class RolloutGroup:
    """The n samples of one prompt, tagged with the policy version that produced them."""

    ticket: int
    prompt: Prompt
    samples: tuple[Sample, ...]
    version: int
    probe: bool = False


@dataclass(frozen=True)
class ScoredGroup:
    """A rollout group with one scalar reward per sample."""

    group: RolloutGroup
    rewards: tuple[float, ...]

    @property
    def zero_variance(self) -> bool:
        return max(self.rewards) == min(self.rewards)


@dataclass(frozen=True)
class TrainBatch:
    """Exactly B scored groups for one learner step (index = the step that consumes it)."""

    index: int
    groups: tuple[ScoredGroup, ...]
    stats: dict = field(default_factory=dict)
