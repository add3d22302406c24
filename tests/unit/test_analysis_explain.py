"""explain(): the gap between reserved and allocated bytes, cut into its causes, over hand-built address spaces.

The run below has three 2 MiB segments of the small pool, free when capture began:
A holds two live blocks with a 1,024 B hole left by the free of m.b between them; B holds
one block whose free was requested and not completed (pending); C stays empty. The
reserved peak's fullest event is the last alloc (event 6).
"""

from __future__ import annotations

from analysis_runs import S1, SEG, _block, cuda, load  # noqa: F401
from fakes import write_trace

from profiler.analysis.explain import BEFORE_CAPTURE, NEVER_USED, PART_NAMES, explain, reserved_peak_index
from profiler.analysis.live import lifetimes

A, B, C = S1, S1 + SEG, S1 + 2 * SEG


def _free_segment(seg, pool=None):
    return _block(seg, seg, SEG, "inactive") | {"segment_pool": pool}


EVENTS = [
    ("alloc", A, 4096, "forward", "m.a"),  # 0
    ("alloc", A + 0x1000, 1000, "forward", "m.b"),  # 1  a 1,024 B block
    ("alloc", B, 2048, "forward", "m.d"),  # 2
    ("free_requested", B, 2048, "forward", "m.d"),  # 3  never completed: pending
    ("free_requested", A + 0x1000, 1000, "forward", "m.b"),  # 4
    ("free_completed", A + 0x1000, 1000, "forward", "m.b"),  # 5  leaves the hole
    ("alloc", A + 0x1400, 8000, "forward", "m.c"),  # 6  an 8,192 B block: the fullest moment
]


def _run(tmp_path, pools=(None, None, None), **meta):
    return load(
        write_trace(
            tmp_path,
            EVENTS,
            segments=[_free_segment(s, p) for s, p in zip((A, B, C), pools)],
            backend="cuda",
            device="cuda:0",
            max_allocated_bytes=12288,
            max_reserved_bytes=3 * SEG,
            **meta,
        )
    )


def test_the_gap_is_cut_into_its_causes_to_the_byte(tmp_path):
    e = explain(_run(tmp_path))
    assert e.event_index == 6
    assert (e.reserved_bytes, e.allocated_bytes) == (3 * SEG, 4096 + 8192)
    assert e.parts == {
        "pending_free": 2048,
        "inactive_split": 1024 + (SEG - 0x3400) + (SEG - 2048),
        "free_segments": SEG,
        "private_pools": 0,
        "unplaced": 0,
    }
    assert sum(e.parts[p] for p in PART_NAMES) == e.gap_bytes == 3 * SEG - 12288
    # 8,000 requested in an 8,192 B block; reserved - requested = rounding + the gap.
    assert (e.rounding_bytes, e.requested_bytes) == (192, 4096 + 8000)
    assert e.reserved_bytes - e.requested_bytes == e.rounding_bytes + e.gap_bytes
    assert e.split_share == e.parts["inactive_split"] / (3 * SEG)
    assert not e.private_pools_known


def test_holes_are_put_down_to_the_free_that_left_them(tmp_path):
    holes = explain(_run(tmp_path)).holes
    by_site = dict(zip(holes["site"], holes["bytes"]))
    # The rest of A after m.c and the rest of B after the pending block were never handed out.
    assert by_site[NEVER_USED] == (SEG - 0x3400) + (SEG - 2048)
    left = holes[holes["module"] == "m.b"]
    assert left[["holes", "bytes"]].values.tolist() == [[1, 1024]]
    assert BEFORE_CAPTURE not in by_site


def test_pending_frees_and_suggestions_carry_measured_bytes(tmp_path):
    e = explain(_run(tmp_path), lt=None)
    assert e.pending[["module", "bytes"]].values.tolist() == [["m.d", 2048]]
    figures = {s.action.split("=")[0].split("(")[0]: s.figure_bytes for s in e.suggestions}
    assert figures["PYTORCH_CUDA_ALLOC_CONF"] == e.parts["inactive_split"]  # expandable segments
    assert figures["torch.cuda.empty_cache"] == SEG
    assert figures["free cross-stream tensors on their own stream, or synchronize before the peak"] == 2048
    assert f"{3 * SEG - 12288:,} B of {3 * SEG:,} B reserved" in e.verdict


def test_expandable_segments_on_suggests_nothing_about_them(tmp_path):
    e = explain(_run(tmp_path, allocator_settings={"expandable_segments": True}))
    assert e.expandable_segments is True
    assert not any("expandable" in s.action or "max_split" in s.action for s in e.suggestions)


def test_the_shared_fixture_at_its_reserved_peak(cuda):  # noqa: F811
    lt = lifetimes(cuda)
    assert reserved_peak_index(cuda, lt) == 5
    e = explain(cuda, lt)
    # analysis_runs' worked layout at event 5: S1's middle hole and tail, S2's and S3's tails.
    assert e.parts["pending_free"] == 512
    assert e.parts["inactive_split"] == 512 + (SEG - 0xA00) + (SEG - 0x400) + (SEG - 0x1000)
    assert e.parts["free_segments"] == e.parts["unplaced"] == 0
    # The hole at S1+0x600 was left by no captured free: it was free when capture began.
    assert sum(e.parts.values()) == e.gap_bytes == 3 * SEG - 6656


def test_free_bytes_in_a_private_pool_are_counted_apart(tmp_path):
    # C in a CUDA graph's pool: its free bytes are the pool's, and empty_cache would not return them.
    e = explain(_run(tmp_path, pools=("0,0", "0,0", "1,0")))
    assert e.private_pools_known
    assert (e.parts["private_pools"], e.parts["free_segments"]) == (SEG, 0)
    assert e.parts["inactive_split"] == 1024 + (SEG - 0x3400) + (SEG - 2048)
    assert sum(e.parts.values()) == e.gap_bytes
    assert not any("empty_cache" in s.action for s in e.suggestions)


def test_no_segments_on_the_cpu_backend(tmp_path):
    run = load(write_trace(tmp_path, EVENTS[:2]))
    assert explain(run).has_segments is False
