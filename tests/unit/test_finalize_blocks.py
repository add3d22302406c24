"""finalize/blocks.py: the caching allocator's rounding and split rules, the block replay, and
block_sizes, its inlined loop, held to the replay's methods."""

from __future__ import annotations

import random

import pytest
from fakes import reference_block_sizes

from profiler.trace.finalize import blocks
from profiler.trace.finalize.blocks import MIN_BLOCK, SMALL_BUFFER, AllocatorRules, BlockReplay

MiB = 1 << 20
SEG = 0x1000_0000


# -- the rules -----------------------------------------------------------------------------------


def test_round_size():
    rules = AllocatorRules()
    assert [rules.round_size(n) for n in (0, 1, 512, 513, MiB + 1)] == [512, 512, 512, 1024, MiB + 512]


def test_roundup_power2_divisions():
    rules = AllocatorRules.from_settings({"roundup_power2_divisions": [4]})  # [1 MiB, 2 MiB): quarters
    assert rules.roundup_divisions[:2] == (4, 0)
    assert rules.round_size(MiB + 1) == MiB + MiB // 4
    assert rules.round_size(MiB + MiB // 4 + 1) == MiB + MiB // 2
    assert rules.round_size(MiB) == MiB  # a power of two stays
    assert rules.round_size(2 * MiB + 1) == 2 * MiB + 512  # the next interval has no divisions
    keyed = AllocatorRules.from_settings({"roundup_power2_divisions": {"2": 8, "1": 4}})
    assert keyed.roundup_divisions[:3] == (4, 8, 0)  # ordered by key


def test_settings():
    assert AllocatorRules.from_settings(None) == AllocatorRules()
    assert AllocatorRules.from_settings({"max_split_size": 3 * MiB}).max_split_size == 3 * MiB
    assert AllocatorRules.from_settings({"max_split_size": -1}).max_split_size == 1 << 62
    assert AllocatorRules.from_settings({"expandable_segments": True}).expandable_segments


def test_should_split():
    rules = AllocatorRules(max_split_size=8 * MiB)
    assert rules.should_split(1024, 512, small=True) and not rules.should_split(1023, 512, small=True)
    assert rules.should_split(4 * MiB, 2 * MiB, small=False)  # more than 1 MiB would remain
    assert not rules.should_split(3 * MiB, 2 * MiB, small=False)  # exactly 1 MiB remains
    assert not rules.should_split(20 * MiB, 9 * MiB, small=False)  # above max_split_size: handed out whole
    assert AllocatorRules(expandable_segments=True).should_split(3 * MiB, 2 * MiB, small=False)


# -- the replay ----------------------------------------------------------------------------------


def _blocks(replay: BlockReplay) -> list[tuple]:
    return sorted((b.addr - SEG, b.size, b.allocated) for b in replay.blocks.values())


def test_alloc_splits_and_free_merges():
    replay = BlockReplay()
    replay.load_segments([(SEG, 20 * MiB, "large", SEG, 20 * MiB, "inactive")])
    assert replay.alloc(SEG, 4 * MiB) == 4 * MiB
    assert _blocks(replay) == [(0, 4 * MiB, True), (4 * MiB, 16 * MiB, False)]
    # 15.5 MiB of a 16 MiB block leaves 0.5 MiB: the block is handed out whole.
    assert replay.alloc(SEG + 4 * MiB, 15 * MiB + MiB // 2) == 16 * MiB
    assert replay.free(SEG, 4 * MiB) == 4 * MiB
    assert replay.free(SEG + 4 * MiB, 15 * MiB + MiB // 2) == 16 * MiB
    assert _blocks(replay) == [(0, 20 * MiB, False)] and replay.misses == 0


def test_events_that_do_not_fit_count_as_misses():
    replay = BlockReplay()
    assert replay.alloc(0x42, 1000) == 1024  # no block there: the rounded request
    assert replay.free(0x42, 1000) == 1024
    assert replay.misses == 2


def test_a_small_segment_splits_down_to_the_minimum_block():
    replay = BlockReplay()
    replay.segment_alloc(SEG, SMALL_BUFFER)
    assert SEG in replay.small_segments
    assert replay.alloc(SEG, 1) == MIN_BLOCK
    assert _blocks(replay) == [(0, MIN_BLOCK, True), (MIN_BLOCK, SMALL_BUFFER - MIN_BLOCK, False)]
    replay.segment_free(SEG, SMALL_BUFFER)
    assert replay.blocks == {} and replay.small_segments == set()


def test_expandable_segments_map_and_unmap():
    replay = BlockReplay(AllocatorRules(expandable_segments=True))
    replay.segment_map(SEG, 2 * MiB)
    replay.segment_map(SEG + 2 * MiB, 2 * MiB)  # grows the free block before it
    assert _blocks(replay) == [(0, 4 * MiB, False)] and replay.segment_bytes == {SEG: 4 * MiB}
    replay.segment_unmap(SEG + MiB, MiB)
    assert _blocks(replay) == [(0, MiB, False), (2 * MiB, 2 * MiB, False)]
    assert replay.segment_bytes == {SEG: 3 * MiB}
    replay.segment_unmap(SEG + 16 * MiB, MiB)  # nothing mapped there
    assert replay.misses == 1


def test_block_sizes_of_a_stream():
    replay = BlockReplay()
    replay.load_segments([(SEG, 20 * MiB, "large", SEG, 20 * MiB, "inactive")])
    actions = ["alloc", "free_requested", "free_completed", "free_requested", "segment_alloc", "oom"]
    addrs = [SEG, SEG, SEG, SEG, SEG + 32 * MiB, 0]
    sizes = [3 * MiB, 3 * MiB, 3 * MiB, 3 * MiB, 2 * MiB, 0]
    # free_requested: the block while it is allocated, the rounded request once it is not.
    assert blocks.block_sizes(actions, addrs, sizes, replay) == [3 * MiB, 3 * MiB, 3 * MiB, 3 * MiB, None, None]
    assert replay.misses == 0 and SEG + 32 * MiB in replay.segment_bytes


# -- block_sizes against the replay's methods ----------------------------------------------------


def _state(r: BlockReplay):
    return (
        [(k, b.addr, b.size, b.segment, b.allocated) for k, b in r.blocks.items()],
        list(r.ends.items()),
        sorted(r.small_segments),
        list(r.segment_bytes.items()),
        r.misses,
    )


SETTINGS = [
    None,
    {"expandable_segments": True},
    {"max_split_size": 3 << 20},
    {"roundup_power2_divisions": {"1": 4, "2": 8}},
]
ACTIONS = [
    "alloc",
    "free_requested",
    "free_completed",
    "segment_alloc",
    "segment_free",
    "segment_map",
    "segment_unmap",
    "oom",
]


def _replay_case(rng: random.Random):
    """Random segments and a stream that mostly frees what it allocated, with some nonsense."""
    rules = AllocatorRules.from_settings(rng.choice(SETTINGS))
    segs, base = [], 0
    for _ in range(rng.randint(0, 4)):
        seg_bytes = rng.choice([2 << 20, 4 << 20, 20 << 20])
        kind = "small" if seg_bytes == 2 << 20 else "large"
        off = 0
        while off < seg_bytes:
            size = min(seg_bytes - off, rng.choice([512, 1024, 1 << 20, 3 << 20]))
            segs.append(
                (base, seg_bytes, kind, base + off, size, rng.choice(["inactive", "inactive", "active_allocated"]))
            )
            off += size
        base += seg_bytes + (1 << 20)
    pool = [s[3] for s in segs] + [rng.randrange(0, base + (64 << 20), 512) for _ in range(20)]
    live, stream = [], []
    for _ in range(rng.randint(0, 400)):
        action = rng.choices(ACTIONS, [6, 2, 5, 1, 0.5, 0.5, 0.5, 0.2])[0]
        if action == "alloc":
            addr = rng.choice(pool)
            size = rng.choice([0, 1, 100, 512, 513, 4096, 1 << 20, (1 << 20) + 5, 3 << 20, 5 << 20])
            live.append((addr, size))
            pool.append(addr + rules.round_size(size))
        elif action in ("free_requested", "free_completed") and live and rng.random() < 0.8:
            addr, size = live.pop(rng.randrange(len(live)))
        else:
            addr, size = rng.choice(pool), rng.choice([512, 1 << 20, 2 << 20, 4 << 20])
        stream.append((action, addr, size))
    return rules, segs, stream


class _CountingReplay(BlockReplay):
    """The reference replay, counting which paths the cases take."""

    paths = {"alloc hit": 0, "split": 0, "free hit": 0, "merge": 0}

    def alloc(self, addr, requested):
        blocks_before, misses_before = len(self.blocks), self.misses
        size = super().alloc(addr, requested)
        self.paths["alloc hit"] += self.misses == misses_before
        self.paths["split"] += len(self.blocks) > blocks_before
        return size

    def free(self, addr, requested):
        blocks_before, misses_before = len(self.blocks), self.misses
        size = super().free(addr, requested)
        self.paths["free hit"] += self.misses == misses_before
        self.paths["merge"] += len(self.blocks) < blocks_before
        return size


def test_block_sizes_is_the_replay_methods_inlined():
    rng = random.Random(7)
    _CountingReplay.paths = dict.fromkeys(_CountingReplay.paths, 0)
    for _ in range(400):
        rules, segs, stream = _replay_case(rng)
        fast, slow = BlockReplay(rules), _CountingReplay(AllocatorRules(**vars(rules)))
        fast.load_segments(segs)
        slow.load_segments(segs)
        actions, addrs, sizes = (list(c) for c in zip(*stream)) if stream else ([], [], [])
        try:
            expected, error = reference_block_sizes(actions, addrs, sizes, slow), None
        except Exception as exc:  # noqa: BLE001 - nonsense streams may fail; both must fail alike
            expected, error = None, type(exc)
        if error is None:
            assert blocks.block_sizes(actions, addrs, sizes, fast) == expected
            assert _state(fast) == _state(slow)
        else:
            with pytest.raises(error):
                blocks.block_sizes(actions, addrs, sizes, fast)
    assert min(_CountingReplay.paths.values()) > 200, _CountingReplay.paths  # every path is taken


def test_block_sizes_fails_where_the_replay_methods_fail():
    # A zero-byte block merges with itself: the methods raise KeyError, and so must the loop.
    segs = [(0x1000, 1024, "small", 0x1000, 0, "active_allocated")]
    for replay, sizes_of in ((BlockReplay(), blocks.block_sizes), (BlockReplay(), reference_block_sizes)):
        replay.load_segments(segs)
        with pytest.raises(KeyError):
            sizes_of(["free_completed"], [0x1000], [0], replay)
