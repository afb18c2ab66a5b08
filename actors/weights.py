"""WeightStore: where the learner publishes each policy version and generators look for it.

With rollout.weight_sync=shm (the default) what is published is a `Slot`: the path of a
file in the learner node's shared memory (pipeline/transport.py); generators on that node
map it. Generators on other nodes cannot see it, so for them (and only when one has asked)
the learner also puts the file's bytes into the object store once per version, and a
generator there stages them into its own node's shared memory. rollout.weight_sync=
object_store keeps the old path (the state pickled through the store), for comparison.
"""
from __future__ import annotations

from collections import Counter


class WeightStore:
    """The newest (version, payload, remote bytes) and the versions evaluations still need."""

    def __init__(self, version: int = 0):
        # `version` = what every engine loads at start (0: the initial model; a resume: its checkpoint)
        self.version, self.payload, self.remote = version, None, None
        self.pins: Counter = Counter()
        self.nodes: set[str] = set()      # nodes generators asked from

    def publish(self, version: int, payload, remote=None, pin: bool = False) -> tuple:
        """Store `payload` (a Slot, or a state dict for the object-store path) as `version`;
        `remote`: [ObjectRef] of the slot's bytes for generators on other nodes, or None.

        A state dict is re-put here so that the store owns it: it outlives the train worker
        that produced it (the final evaluation reads it after training ends).
        """
        import ray
        if version <= self.version:
            raise ValueError(f"weights version {version} is not newer than {self.version}")
        if isinstance(payload, dict):
            payload = [ray.put(payload)]
        self.version, self.payload, self.remote = version, payload, remote
        if pin:   # an evaluation will read this version: its slot must not be rewritten yet
            self.pins[version] += 1
        return self.version, self.payload, self.remote

    def latest(self, node: str = "") -> tuple:
        if node:
            self.nodes.add(node)
        return self.version, self.payload, self.remote

    def other_nodes(self, node: str) -> bool:
        """Has a generator on a node other than `node` asked for weights?"""
        return any(n != node for n in self.nodes)

    def pin(self, version: int) -> None:
        self.pins[version] += 1

    def unpin(self, version: int) -> None:
        self.pins[version] -= 1
        if self.pins[version] <= 0:
            del self.pins[version]

    def pinned(self) -> set[int]:
        return set(self.pins)


class Publisher:
    """Learner rank 0's side of publishing: write the version once, tell the store.

    `state` is the full fp32 state gathered for this step; the slot holds it in the
    engine's dtype (model.dtype), so a bf16 run moves half the bytes.
    """

    def __init__(self, cfg, store, run_dir: str):
        import torch
        self.cfg, self.store, self.run_dir, self.writer = cfg, store, run_dir, None
        self.dtype = getattr(torch, cfg.model.dtype)   # float32 | bfloat16 (config.py checks), as save_policy casts

    def publish(self, version: int, state: dict, pin: bool = False) -> tuple:
        import ray
        if self.cfg.rollout.weight_sync == "object_store":
            return ray.get(self.store.publish.remote(version, state, None, pin))
        from pipeline.transport import state_bytes
        if self.writer is None:
            self.writer = self._writer(state_bytes(state, self.dtype))
        slot = self.writer.write(version, state, self.dtype, avoid=ray.get(self.store.pinned.remote()))
        remote = None
        if ray.get(self.store.other_nodes.remote(slot.node)):   # one copy into the object store for them
            import numpy as np
            remote = [ray.put(np.frombuffer(self.writer.buffer(slot), dtype=np.uint8))]   # a list: Ray would resolve a bare ref
        return ray.get(self.store.publish.remote(version, slot, remote, pin))

    def _writer(self, nbytes: int):
        """A fresh slot directory for this life of the run (a previous life's files removed)."""
        import shutil
        import ray
        from pipeline.transport import SlotWriter, slot_dir
        where = slot_dir(self.run_dir, nbytes)
        shutil.rmtree(where, ignore_errors=True)
        return SlotWriter(where, node=ray.get_runtime_context().get_node_id())


def remove_slots(slot_path: str) -> None:
    """Delete a run's slot directory (run as a task on the node that holds it)."""
    import shutil
    from pathlib import Path
    shutil.rmtree(Path(slot_path).parent, ignore_errors=True)
