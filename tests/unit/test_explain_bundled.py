"""explain() on the bundled H100 traces: the gap accounted to the byte, the split share dropping
with expandable segments, and inactive splits that agree with the allocator's own counter."""

from __future__ import annotations

from pathlib import Path

import pytest

from profiler.analysis.explain import PART_NAMES, explain
from profiler.analysis.live import lifetimes
from profiler.analysis.timeline import reserved_bytes, step_spans
from profiler.cli import main
from profiler.trace.reader import load_trace

TRACES = Path(__file__).resolve().parents[2] / "traces"
SEEDS = TRACES / "h100-ablation-seeds"
BASELINE = next(SEEDS.glob("ablate-seeds-baseline-*"))
EXPANDABLE = next(SEEDS.glob("ablate-seeds-expandable-*"))
KV_CONCAT = next((TRACES / "h100-ablation-kv").glob("ablate-kv-vary-kv-concat-*"))  # Llama, DynamicCache
GPT_CONCAT = next((TRACES / "h100-ablation-kv").glob("ablate-kv-baseline-*"))  # GPT-2, the torch.cat cache


@pytest.mark.parametrize("run", [BASELINE, EXPANDABLE, KV_CONCAT], ids=lambda p: p.name.split("-2026")[0])
def test_the_gap_adds_up_to_the_byte(run):
    trace = load_trace(run)
    lt = lifetimes(trace)
    e = explain(trace, lt)
    assert e.parts["unplaced"] == 0
    assert sum(e.parts[p] for p in PART_NAMES) == e.gap_bytes == e.reserved_bytes - e.allocated_bytes
    # The replayed segments hold what the allocator's segment events say is reserved then.
    assert e.reserved_bytes == int(reserved_bytes(trace)[e.event_index]) == trace.meta["max_reserved_bytes"]
    assert e.allocated_bytes == int(lt.allocated_bytes[e.event_index])


def test_expandable_segments_cut_the_split_share():
    base, expandable = explain(load_trace(BASELINE)), explain(load_trace(EXPANDABLE))
    assert base.expandable_segments is False and expandable.expandable_segments is True
    assert expandable.split_share < base.split_share / 3
    assert any("expandable_segments:True" in s.action for s in base.suggestions)
    assert not any("expandable_segments" in s.action for s in expandable.suggestions)


@pytest.mark.parametrize("run, steps", [(KV_CONCAT, (1, 20, 64)), (GPT_CONCAT, (0, 29, 64))], ids=["llama", "gpt"])
def test_splits_at_step_ends_agree_with_the_allocator_counter(run, steps):
    trace = load_trace(run)
    lt = lifetimes(trace)
    ends = step_spans(trace, lt).set_index("step")["event_index_end"]
    counter = trace.steps.set_index("step")["inactive_split_bytes"]
    for step in steps:
        e = explain(trace, lt, int(ends[step]))
        assert e.parts["inactive_split"] == int(counter[step])
        assert sum(e.parts.values()) == e.gap_bytes and e.at_reserved_peak is False


def test_the_torch_cat_cache_fragments_as_it_decodes():
    trace = load_trace(GPT_CONCAT)
    lt = lifetimes(trace)
    ends = step_spans(trace, lt).set_index("step")["event_index_end"]
    first, last = (explain(trace, lt, int(ends[s])) for s in (0, 64))
    # Reserved stays put while the holes between the growing K/V tensors more than double.
    assert first.reserved_bytes == last.reserved_bytes
    assert last.parts["inactive_split"] > 2 * first.parts["inactive_split"]
    assert any(h.startswith("concat.py:") for h in last.holes["site"])
    # The cache's tensors change size every token: the bucket suggestion names its line.
    (buckets,) = [s for s in last.suggestions if s.action.startswith("pad variable-length")]
    grown = last.holes[last.holes["site"].str.startswith("concat.py:")]["bytes"].sum()
    assert buckets.figure_bytes == grown and "concat.py:33 update" in buckets.why


def test_cli_explain_step_out_of_range_is_one_line(capsys):
    assert main(["explain", str(EXPANDABLE), "--step", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 99 is not in this run" in err
