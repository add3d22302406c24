"""The allocator's slack at every step end, on the hand-built CUDA run of analysis_runs.py with a
steps table written as the allocator would have counted it, and the verdict on synthetic tables."""

from __future__ import annotations

import pandas as pd
from analysis_runs import S1, S2, S3, SEG, cpu, cuda, cuda_run_with_steps, load  # noqa: F401

from profiler.analysis import segment_map_at
from profiler.analysis.fragmentation import fragmentation_at_peak
from profiler.analysis.slack import (
    SLACK_COLUMNS,
    SlackVerdict,
    collapse_segments,
    not_recorded,
    ranking_for,
    segment_slack,
    slack_by_step,
    slack_verdict,
)
from profiler.units import human_bytes

# The counters at each step end: step 0 ends at event 4, step 1 at event 10 (the run's last).
STEP0 = dict(step=0, reserved_bytes=3 * SEG, active_bytes=6144, inactive_split_bytes=(SEG - 2048) + (SEG - 4096))
STEP1 = dict(step=1, reserved_bytes=2 * SEG, active_bytes=3584, inactive_split_bytes=(SEG - 1536) + (SEG - 2048))


def _run(tmp_path, steps: list[dict]):
    return load(cuda_run_with_steps(tmp_path, steps))


def test_every_step_end_with_the_counters_and_the_replayed_largest_block(tmp_path):
    by_step = slack_by_step(_run(tmp_path, [{**STEP0, "num_alloc_retries": 0}, {**STEP1, "num_alloc_retries": 0}]))
    assert list(by_step.columns) == list(SLACK_COLUMNS)
    assert by_step.astype(object).values.tolist() == [
        # S2 is wholly free at step 0's end: the largest free block, though no split.
        [0, 4, 3 * SEG, 6144, 3 * SEG - 6144, 4_188_160, SEG, 0],
        [1, 10, 2 * SEG, 3584, 2 * SEG - 3584, 4_190_720, SEG - 1536, 0],
    ]
    assert not_recorded(by_step) == []
    v = slack_verdict(by_step)
    # 4,188,160 of 6,285,312 cached-but-free bytes (67%) lie between live blocks.
    assert (v.matters, v.step, v.at_step["cached_free_bytes"]) == ("inactive_split_bytes", 0, 6_285_312)
    assert v.sentence == (
        "Inactive split matters: at the end of step 0, the first step end at the most reserved (6.00 MiB),"
        " 3.99 MiB (67%) of the 5.99 MiB cached but free lies between live blocks and serves only requests"
        " that fit there; the largest free block is 2.00 MiB; no allocation retried."
    )


def test_retries_matter_and_a_step_the_replay_does_not_reproduce_has_no_largest_block(tmp_path):
    # A step with no events of its own; its reserved counter is not what the replay holds after event 10.
    step2 = dict(step=2, reserved_bytes=3 * SEG, active_bytes=3584, inactive_split_bytes=0, num_alloc_retries=2)
    steps = [{**STEP0, "num_alloc_retries": 0}, {**STEP1, "num_alloc_retries": 0}, step2]
    by_step = slack_by_step(_run(tmp_path, steps))
    assert by_step["event_index"].tolist() == [4, 10, 10]
    assert by_step["largest_free_block_bytes"].tolist() == [SEG, SEG - 1536, pd.NA]
    v = slack_verdict(by_step)
    assert (v.matters, v.step) == ("num_alloc_retries", 0)
    assert v.sentence.startswith("Allocator retries matter: 2 by the last step end, the first in step 2:")
    assert v.sentence.endswith(f"({human_bytes(3 * SEG)}), {human_bytes(3 * SEG - 6144)} is cached but free.")


def test_cached_but_free_matters_when_little_of_it_is_split():
    gib = 1 << 30
    by_step = pd.DataFrame(
        {
            "step": [0, 1, 2],
            "event_index": [9, 19, 29],
            "reserved_bytes": [gib // 2, gib, gib],
            "active_bytes": [gib // 4, gib // 4, gib // 8],
            "inactive_split_bytes": [1 << 20, 1 << 26, 1 << 26],
            "largest_free_block_bytes": [gib // 8, gib // 2, gib // 2],
            "num_alloc_retries": [0, 0, 0],
        }
    ).astype("Int64")
    by_step["cached_free_bytes"] = by_step["reserved_bytes"] - by_step["active_bytes"]
    v = slack_verdict(by_step)
    assert (v.matters, v.step, v.at_step["cached_free_bytes"]) == ("cached_free_bytes", 1, 805_306_368)
    assert v.sentence == (
        "Cached but free matters: at the end of step 1, the first step end at the most reserved (1.00 GiB),"
        " 768.00 MiB is cached but free and 64.00 MiB (8%) of it is split between live blocks; the largest"
        " free block is 512.00 MiB; no allocation retried, so this is the cache keeping freed blocks for"
        " reuse, not fragmentation."
    )


def test_a_cpu_run_records_none_of_them(cpu):
    by_step = slack_by_step(cpu)
    assert by_step["step"].tolist() == [0, 1, 2]
    assert not_recorded(by_step) == ["cached but free", "inactive split", "largest free block", "allocator retries"]
    assert slack_verdict(by_step).matters == ""


def test_segments_ranked_by_the_free_bytes_they_hold(cuda):
    layout = segment_map_at(cuda, 5)
    ranked = segment_slack(layout)
    assert ranked.values.tolist() == [
        # segment, its bytes, used (live and pending free), free, split (free beside live), largest free
        [S2, SEG, 1024, SEG - 1024, SEG - 1024, SEG - 1024],
        [S1, SEG, 2048, SEG - 2048, SEG - 2048, SEG - 0xA00],
        [S3, SEG, 4096, SEG - 4096, SEG - 4096, SEG - 4096],
    ]
    assert ranked["inactive_split_bytes"].sum() == fragmentation_at_peak(cuda)["inactive_split_bytes"]
    top = collapse_segments(layout, 2)
    assert top["segment_addr"].drop_duplicates().tolist() == [S2, S1]
    assert top["size_bytes"].sum() == 2 * SEG
    assert top[top["segment_addr"] == S1]["block_addr"].is_monotonic_increasing
    assert len(collapse_segments(layout, None)) == len(layout)


def test_segments_ranked_by_what_the_verdict_names(cuda):
    # Step 0's end: S2 is wholly free (its pending block completed at event 3), S1 and S3 split.
    layout = segment_map_at(cuda, 4)
    assert segment_slack(layout)["segment_addr"].tolist() == [S1, S3, S2]
    by_free = segment_slack(layout, "free_bytes")
    assert by_free[["segment_addr", "free_bytes", "inactive_split_bytes"]].values.tolist() == [
        [S2, SEG, 0],
        [S1, SEG - 2048, SEG - 2048],
        [S3, SEG - 4096, SEG - 4096],
    ]
    assert collapse_segments(layout, 1, "free_bytes")[["block_addr", "size_bytes", "state"]].values.tolist() == [
        [S2, SEG, "inactive"]
    ]
    split = SlackVerdict("inactive_split_bytes", 0, {}, "")
    assert ranking_for(split) == "inactive_split_bytes"
    assert ranking_for(SlackVerdict("cached_free_bytes", 0, {}, "")) == "free_bytes"
