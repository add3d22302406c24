"""Hostile torch memory snapshots: pickles that are small on disk and huge or wrong when read.

Each builder returns the bytes of one pickle. A list holding another list twice, forty levels
deep, is a few hundred bytes and 2^40 elements once expanded; a segment or frame list shared
two million times costs a few bytes per reference on disk. The rest put an integer out of range,
a value of the wrong type, or something that is no pickle at all where the import reads.
"""

from __future__ import annotations

import pickle

MIB = 1 << 20
SEG = 1 << 32


def _frame(name="f", line=1):
    return {"filename": "train.py", "line": line, "name": name}


def _segment(**over):
    seg = {
        "device": 0,
        "address": SEG,
        "total_size": 2 * MIB,
        "stream": 0,
        "segment_type": "large",
        "is_expandable": False,
        "blocks": [
            {"address": SEG, "size": MIB, "requested_size": MIB, "state": "active_allocated", "frames": [_frame()]},
            {"address": SEG + MIB, "size": MIB, "requested_size": 0, "state": "inactive", "frames": []},
        ],
    }
    seg.update(over)
    return seg


def _entry(**over):
    e = {"action": "alloc", "addr": SEG, "size": MIB, "stream": 0, "time_us": 10, "frames": [_frame()]}
    e.update(over)
    return e


def _snap(segments=None, entries=None, **over):
    snap = {
        "segments": [_segment()] if segments is None else segments,
        "device_traces": [[_entry()] if entries is None else entries],
        "allocator_settings": {},
    }
    snap.update(over)
    return snap


def _list_bomb(depth=40):
    v: list = []
    for _ in range(depth):
        v = [v, v]
    return v


def _tuple_bomb(depth=40):
    v: tuple = ()
    for _ in range(depth):
        v = (v, v)
    return v


def _dict_bomb(depth=40):
    v: dict = {}
    for _ in range(depth):
        v = {"a": v, "b": v}
    return v


def _self_list():
    v: list = []
    v.append(v)
    return v


def _block(**over):
    b = {"address": SEG, "size": MIB, "requested_size": MIB, "state": "active_allocated"}
    b.update(over)
    return b


def _dumps(value) -> bytes:
    return pickle.dumps(value, protocol=4)


_SHARED_FRAMES = [_frame(f"f{i}", i) for i in range(1000)]


# name -> value to pickle (or bytes as they are)
def hostile_snapshots() -> dict[str, object]:
    bomb = _list_bomb()
    return {
        "list_bomb_whole": bomb,
        "list_bomb_as_segments": _snap(segments=bomb),
        "list_bomb_in_segments": _snap(segments=[bomb]),
        "list_bomb_as_block": _snap(segments=[_segment(blocks=[bomb])]),
        "list_bomb_as_entry": _snap(entries=[bomb]),
        "list_bomb_as_frames": _snap(entries=[_entry(frames=bomb)]),
        "list_bomb_as_filename": _snap(entries=[_entry(frames=[{"filename": bomb, "line": 1, "name": bomb}])]),
        "list_bomb_as_user_metadata": _snap(entries=[_entry(user_metadata=bomb)]),
        "list_bomb_as_settings": _snap(allocator_settings=bomb),
        "list_bomb_in_settings": _snap(allocator_settings={"max_split_size": bomb, "roundup_power2_divisions": bomb}),
        "list_bomb_as_torch_version": _snap(torch_version=bomb),
        "list_bomb_as_action": _snap(entries=[_entry(action=bomb)]),
        "tuple_bomb_as_segments": _snap(segments=_tuple_bomb()),
        "tuple_bomb_as_key_text": _snap(entries=[_entry(frames=[{"filename": _tuple_bomb(), "line": 1}])]),
        "dict_bomb_whole": _dict_bomb(),
        "dict_bomb_as_segment": _snap(segments=[_dict_bomb()]),
        "self_list_as_segments": _snap(segments=_self_list()),
        "segment_shared_2m": _snap(segments=[_segment()] * 2_000_000),
        "blocks_shared_in_segments": _snap(segments=[_segment(blocks=[_block()] * 30_000)] * 1000),
        "frame_list_shared_200k": _snap(entries=[_entry(frames=_SHARED_FRAMES)] * 200_000),
        "one_stack_of_1m_frames": _snap(entries=[_entry(frames=[_frame()] * 1_000_000)]),
        "device_traces_100k": _snap() | {"device_traces": [[]] * 100_000},
        "total_size_2_70": _snap(segments=[_segment(total_size=2**70)]),
        "address_negative": _snap(segments=[_segment(address=-1)]),
        "size_2_63": _snap(entries=[_entry(size=2**63)]),
        "time_2_64": _snap(entries=[_entry(time_us=2**64)]),
        "stream_2_80": _snap(entries=[_entry(stream=2**80)]),
        "block_size_2_70": _snap(segments=[_segment(blocks=[_block(size=2**70)])]),
        "requested_negative": _snap(segments=[_segment(blocks=[_block(requested_size=-5)])]),
        "addr_float": _snap(entries=[_entry(addr=1.5)]),
        "size_bool": _snap(entries=[_entry(size=True)]),
        "huge_int_size": _snap(entries=[_entry(size=10**5000)]),
        "unknown_block_state": _snap(segments=[_segment(blocks=[_block(state="weird")])]),
        "device_2_40": _snap(segments=[_segment(device=2**40)]),
        "settings_wrong_types": _snap(allocator_settings={"max_split_size": "abc", "roundup_power2_divisions": [-1]}),
        "frame_line_2_100": _snap(entries=[_entry(frames=[_frame(line=2**100)])]),
        "addr_none": _snap(entries=[_entry(addr=None, size=None)]),
        "free_without_alloc": _snap(entries=[_entry(action="free_completed", addr=SEG + MIB)]),
        "deep_nesting": _deep(100_000),
        "global_reference": _GlobalPickle(),
        "truncated": b"\x80\x04\x95",
        "empty_file": b"",
        "not_a_pickle": b"hello, world\n" * 10,
    }


def _deep(depth: int) -> bytes:
    """Lists nested `depth` deep, written opcode by opcode (pickle.dumps would recurse)."""
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


class _GlobalPickle:
    """Pickles as a call to os.system: the import must refuse it without running it."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/vramscope-pickle-ran",))


def hostile_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else _dumps(value)
