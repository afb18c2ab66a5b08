"""WeightStore: where the learner publishes (version, weights) and generators look."""
from __future__ import annotations


class WeightStore:
    """Holds the latest published policy version and an ObjectRef to its state dict.

    The store re-puts the weights itself so that it owns them: they outlive the train
    worker that produced them (the final evaluation reads them after training ends).
    Ray 2.56 removed `ray.put(_owner=...)`, which would have saved this one copy.
    """

    def __init__(self, version: int = 0):
        # `version` = what every engine loads at start (0: the initial model; a resume: its checkpoint)
        self.version, self.refs = version, None

    def publish(self, version: int, state: dict) -> tuple[int, list]:
        """Store `state` as `version`; returns (version, [ref]) for callers that want the ref."""
        import ray
        if version <= self.version:
            raise ValueError(f"weights version {version} is not newer than {self.version}")
        self.version, self.refs = version, [ray.put(state)]
        return self.version, self.refs

    def latest(self) -> tuple[int, list | None]:
        return self.version, self.refs
