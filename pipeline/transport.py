"""Weight transport: the learner's weights to the generators through shared memory, by path.

Pure (no Ray): the learner writes each published version into a node-local file
(/dev/shm when it has room) in the engine's dtype; only a small `Slot` (version, path,
node) travels through Ray and through vLLM's RPCs. A reader maps the file and gets
tensors that are views of its pages: nothing is pickled, nothing is copied before the
engine copies the weights into its own parameters. The files are safetensors files
(`safetensors.safe_open` reads them), so any tool can inspect a published version.

Why not the object store: the old path pickled the whole fp32 state into the object store
twice (the call argument, then the WeightStore's re-put), every generator unpickled it,
and an engine core in a subprocess packed it again into one RPC blob, which vLLM's msgpack
encoder refuses beyond 2**32 - 1 bytes (vllm/v1/serial_utils.py; 7B in fp32 is 30.5 GB).

Lifetimes: files are a small ring rewritten in place (fresh shared-memory pages cost more
than the copy: see SlotWriter). The header's version field is a seqlock, so a reader that
raced a rewrite knows it (`TornRead`) and asks for the newest version again; a version an
evaluation still needs is pinned and its slot is not reused.
Test: `pytest tests/unit/test_transport.py -q`.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' dtype names (the format's spec)
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
BY_NAME = {v: k for k, v in DTYPES.items()}
MAX_INLINE_BYTES = 4 << 20   # the most an RPC argument may carry inline: handles, never weights
SHM = Path("/dev/shm")
_WRITING = "writing....."      # the version field while a slot is rewritten (12 characters)


class TornRead(RuntimeError):
    """The slot was rewritten while it was read: ask the store for the newest version again."""


@dataclass(frozen=True)
class Slot:
    """One published version in one file on one node: what travels instead of the weights."""

    version: int
    path: str
    nbytes: int
    node: str = ""        # Ray node id of the writer ("" outside Ray)


def slot_dir(run_dir: str | Path, need_bytes: int = 0, shm: Path = SHM) -> Path:
    """Where a run's slots live: /dev/shm/greso-<hash of the run dir> when shared memory holds
    three versions (newest, one being read, one pinned), else RUN_DIR/weights on disk."""
    tag = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    if shm.is_dir() and shutil.disk_usage(shm).free > 3 * need_bytes:
        return shm / f"greso-{tag}"
    return Path(run_dir) / "weights"


def state_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes of `state` once cast to `dtype` (None: as it is)."""
    return sum(t.numel() * _size(dtype or t.dtype) for t in state.values())


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _stamp(version: int | None) -> bytes:
    return (_WRITING if version is None else f"{version:012d}").encode()


_VERSION_KEY = b'"version":"'


def _stamp_offset(header: bytes) -> int:
    """Where the 12-character version field starts in the file (header after the 8-byte length)."""
    return 8 + header.index(_VERSION_KEY) + len(_VERSION_KEY)


def _layout(state: dict[str, torch.Tensor], dtype) -> tuple[bytes, list[tuple[torch.dtype, int, int]], int]:
    """(header, per tensor (dtype, start, end) in the data section, data bytes). The header is
    a safetensors header whose metadata holds a fixed-width version field."""
    header, entries, offset = {}, [], 0
    for name, t in state.items():
        d = dtype or t.dtype
        n = t.numel() * _size(d)
        header[name] = {"dtype": DTYPES[d], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        entries.append((d, offset, offset + n))
        offset += n
    header["__metadata__"] = {"format": "pt", "version": _WRITING}
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8), entries, offset      # safetensors pads its header to 8 bytes


class SlotWriter:
    """The learner's side: a ring of slot files, each sized once, kept mapped, rewritten in place.

    Fresh shared-memory pages are expensive (on this project's CI VM, allocating them costs
    ~3 s per GB against ~0.08 s for the copy), so a version goes into the slot holding the
    oldest version that is neither the newest nor in `avoid` (versions an evaluation pins);
    only when every slot is taken does the ring grow.
    """

    def __init__(self, directory: Path, node: str = ""):
        self.directory, self.node = Path(directory), node
        self.slots: list[dict] = []      # {"path", "mm", "header", "stamp", "version"}

    def write(self, version: int, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
              avoid=frozenset()) -> Slot:
        """Write `state` cast to `dtype` as `version` (one copy per tensor, the cast fused into it)."""
        header, entries, data = _layout(state, dtype)
        slot = self._slot_for(header, data, set(avoid))
        mm, base = slot["mm"], 8 + len(header)
        self._stamp(slot, None)
        buf = torch.frombuffer(mm, dtype=torch.uint8)
        for (d, start, end), t in zip(entries, state.values()):
            if end > start:
                buf[base + start:base + end].view(d).view(t.shape).copy_(t.detach())
        self._stamp(slot, version)
        return Slot(version, slot["path"], len(mm), self.node)

    def _slot_for(self, header: bytes, data: int, avoid: set[int]) -> dict:
        newest = max((s["version"] for s in self.slots), default=None)
        free = [s for s in self.slots if s["header"] == header and s["version"] != newest
                and s["version"] not in avoid]
        return min(free, key=lambda s: s["version"]) if free else self._new_slot(header, data)

    def _new_slot(self, header: bytes, data: int) -> dict:
        self.directory.mkdir(parents=True, exist_ok=True)
        size = 8 + len(header) + data
        path = self.directory / f"slot{len(self.slots)}.safetensors"
        with open(path, "wb+") as f:
            try:   # reserve the pages now: a full tmpfs would otherwise SIGBUS the first write into the map
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                path.unlink(missing_ok=True)
                raise OSError(f"no room for weight slot {path} ({size / 1e9:.1f} GB; {e.strerror}): free space "
                              f"in {self.directory} or set rollout.weight_sync=object_store") from None
            # MAP_POPULATE maps every page now, once, instead of a fault per 4 KiB later
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        mm[:8] = len(header).to_bytes(8, "little")
        mm[8:8 + len(header)] = header
        slot = {"path": str(path), "mm": mm, "header": header, "stamp": _stamp_offset(header), "version": -1}
        self.slots.append(slot)
        return slot

    def _stamp(self, slot: dict, version: int | None) -> None:
        slot["mm"][slot["stamp"]:slot["stamp"] + 12] = _stamp(version)
        slot["version"] = -1 if version is None else version

    def buffer(self, slot: Slot) -> mmap.mmap:
        """The mapped bytes of a slot this writer wrote (to put them in the object store)."""
        return next(s["mm"] for s in self.slots if s["path"] == slot.path)

    def close(self) -> None:
        for s in self.slots:
            s["mm"].close()
        self.slots = []


class SlotReader:
    """The generator's side: slot files mapped once (read-only, shared) and kept mapped.

    `load(slot, into)` hands views of the mapped pages to `into` (the engine's copy into its
    parameters), then checks the version field again: a slot rewritten meanwhile raises
    TornRead, and the caller asks the store for the newest version.
    """

    def __init__(self):
        self.maps: dict[str, tuple[mmap.mmap, int, dict, int]] = {}

    def load(self, slot: Slot, into) -> None:
        mm, stamp, views = self._open(slot.path)
        if self._version(mm, stamp) != slot.version:
            raise TornRead(f"{slot.path} no longer holds v{slot.version}")
        into(views)
        if self._version(mm, stamp) != slot.version:
            raise TornRead(f"{slot.path} was rewritten while v{slot.version} was loaded")

    def _open(self, path: str):
        if path not in self.maps:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ)
            self.maps[path] = (mm, *views_of(mm))
        mm, views, stamp = self.maps[path]
        return mm, stamp, views

    @staticmethod
    def _version(mm, stamp: int) -> int:
        field = bytes(mm[stamp:stamp + 12])
        return -1 if field == _WRITING.encode() else int(field)

    def close(self) -> None:
        for mm, *_ in self.maps.values():
            mm.close()
        self.maps = {}


def views_of(buffer) -> tuple[dict[str, torch.Tensor], int]:
    """(name -> tensor viewing `buffer`, offset of the version field) of a slot's bytes: a
    mapped file, or the same bytes fetched through Ray's object store (a numpy array)."""
    n = int.from_bytes(bytes(buffer[:8]), "little")
    raw = bytes(buffer[8:8 + n])
    header = json.loads(raw)
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    with warnings.catch_warnings():   # read-only pages: the engine copies from the views, never writes them
        warnings.simplefilter("ignore", UserWarning)
        for name, h in header.items():
            start, end = h["data_offsets"]
            dtype = BY_NAME[h["dtype"]]
            count = (end - start) // _size(dtype)
            t = (torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + start) if count
                 else torch.empty(0, dtype=dtype))
            out[name] = t.view(h["shape"])
    return out, _stamp_offset(raw)
