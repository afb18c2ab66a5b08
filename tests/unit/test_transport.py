"""Shared-memory weight slots: what the learner writes is what a generator reads, in the
engine's dtype, with a ring that reuses its files and a seqlock that catches a rewrite."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from pipeline.transport import SlotReader, SlotWriter, TornRead, slot_dir, state_bytes, views_of


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(64, 16, generator=g), "layer.bias": torch.randn(16, generator=g),
            "empty": torch.zeros(0), "scalar": torch.tensor(3.0)}


def _read(slot) -> dict[str, torch.Tensor]:
    got = {}
    SlotReader().load(slot, lambda views: got.update({k: v.clone() for k, v in views.items()}))
    return got


def test_a_slot_holds_the_state_cast_to_the_engine_dtype_and_is_a_safetensors_file(tmp_path):
    state = _state(0)
    slot = SlotWriter(tmp_path).write(7, state, torch.bfloat16)
    got = _read(slot)
    assert got.keys() == state.keys() and slot.version == 7
    for k, v in state.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16))
    with safe_open(slot.path, "pt") as f:        # any tool can open a published version
        assert f.metadata()["version"] == "000000000007"
        assert torch.equal(f.get_tensor("embed.weight"), state["embed.weight"].to(torch.bfloat16))
    assert state_bytes(state, torch.bfloat16) == (64 * 16 + 16 + 1) * 2


def test_the_ring_reuses_files_and_never_overwrites_the_newest_or_a_pinned_version(tmp_path):
    w = SlotWriter(tmp_path)
    a, b = w.write(1, _state(1)), w.write(2, _state(2))
    assert a.path != b.path
    c = w.write(3, _state(3))
    assert c.path == a.path                        # v1 was neither the newest nor pinned
    d = w.write(4, _state(4), avoid={2})           # v2 pinned by an evaluation: the ring grows
    assert d.path not in (b.path, c.path) and len(list(tmp_path.iterdir())) == 3
    assert torch.equal(_read(b)["embed.weight"], _state(2)["embed.weight"])
    assert torch.equal(_read(d)["layer.bias"], _state(4)["layer.bias"])


def test_a_reader_sees_a_rewrite_as_a_torn_read(tmp_path):
    w = SlotWriter(tmp_path)
    first, second = w.write(1, _state(1)), w.write(2, _state(2))
    reader = SlotReader()
    reader.load(first, lambda views: None)          # mapped once, kept mapped
    w.write(3, _state(3))                           # reuses v1's file
    with pytest.raises(TornRead, match="no longer holds v1"):
        reader.load(first, lambda views: None)
    with pytest.raises(TornRead, match="rewritten while v2"):   # v4 goes into v2's file mid-load
        reader.load(second, lambda views: w.write(4, _state(4)))


def test_views_of_reads_the_same_bytes_from_any_buffer(tmp_path):
    slot = SlotWriter(tmp_path).write(1, _state(0))
    views, _ = views_of(bytearray(open(slot.path, "rb").read()))
    assert torch.equal(views["embed.weight"], _state(0)["embed.weight"])


def test_slots_go_to_disk_when_shared_memory_is_too_small(tmp_path):
    assert slot_dir(tmp_path, 0).parent.name == "shm" or not slot_dir(tmp_path, 0).is_relative_to(tmp_path)
    assert slot_dir(tmp_path, 1 << 60) == tmp_path / "weights"
    assert slot_dir(tmp_path, 0, shm=tmp_path / "absent") == tmp_path / "weights"


def test_transport_imports_no_ray():
    code = "import sys, pipeline.transport; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_slot_that_does_not_fit_fails_in_one_line_instead_of_a_sigbus_later(tmp_path):
    with pytest.raises(OSError, match="no room for weight slot .*rollout.weight_sync=object_store"):
        SlotWriter(tmp_path)._new_slot(b"{}      ", 1 << 52)     # 4 PB
    assert not list(tmp_path.iterdir())
