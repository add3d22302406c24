"""profiler.analysis.stacks and profiler.analysis.kv on small hand-made tables, and on a bundled run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from profiler.analysis.kv import SUMMARY_COLUMNS, WASTE_COLUMNS, kv_summary, kv_table, kv_token_bytes, kv_waste
from profiler.analysis.stacks import NO_STACK, TREE_COLUMNS, frame_labels, stack_tree
from profiler.trace.reader import load_trace

TRACES = Path(__file__).resolve().parents[2] / "traces"

FRAMES = pd.DataFrame(
    {
        "frame_id": [10, 11, 12],
        "filename": ["/src/model.py", "/src/train.py", "/src/model.py"],
        "line": [5, 40, 9],
        "function": ["attn", "main", "mlp"],
    }
)
# frame_ids innermost first: both sites are called from main.
STACKS = pd.DataFrame({"stack_id": [1, 2, 3], "frame_ids": [[10, 11], [12, 11], None]})
MAIN, ATTN, MLP = "train.py:40 main", "model.py:5 attn", "model.py:9 mlp"


def _live(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["stack_id", "size_bytes"])


def test_frame_labels_name_function_file_and_line():
    assert frame_labels(FRAMES) == {10: ATTN, 11: MAIN, 12: MLP}


def test_stack_tree_nodes_sum_the_sites_below_them():
    tree = stack_tree(_live([(1, 300), (1, 100), (2, 250), (None, 50)]), STACKS, FRAMES)
    assert list(tree.columns) == TREE_COLUMNS
    nodes = {row.id: (row.parent, row.label, row.bytes) for row in tree.itertuples()}
    assert nodes == {
        MAIN: ("", MAIN, 650),
        f"{MAIN}/{ATTN}": (MAIN, ATTN, 400),
        f"{MAIN}/{MLP}": (MAIN, MLP, 250),
        NO_STACK: ("", NO_STACK, 50),
    }
    assert tree.loc[tree["parent"] == "", "bytes"].sum() == 700


def test_stack_tree_keeps_the_top_sites_and_the_innermost_frames():
    live = _live([(1, 400), (2, 250)])
    assert stack_tree(live, STACKS, FRAMES, top=1)["label"].tolist() == [MAIN, ATTN]
    shallow = stack_tree(live, STACKS, FRAMES, depth=1)
    assert shallow[["id", "parent"]].values.tolist() == [[ATTN, ""], [MLP, ""]]


def test_stack_tree_of_unknown_frames_and_empty_sets():
    stacks = pd.DataFrame({"stack_id": [4], "frame_ids": [[99]]})
    assert stack_tree(_live([(4, 8)]), stacks, FRAMES)["label"].tolist() == ["frame 99"]
    assert stack_tree(_live([(3, 8)]), STACKS, FRAMES)["label"].tolist() == [NO_STACK]  # no frames kept
    empty = stack_tree(_live([]), STACKS, FRAMES)
    assert empty.empty and list(empty.columns) == TREE_COLUMNS


def _kv_trace(rows) -> SimpleNamespace:
    columns = ["step", "cache", "batch", "tokens", "token_state_bytes", "reserved_bytes", "extra_bytes"]
    return SimpleNamespace(kv=pd.DataFrame(rows, columns=columns))


def test_kv_table_counts_tokens_and_unused_bytes():
    kv = kv_table(_kv_trace([(0, "dyn", 2, 10, 2000, 3000, None), (1, "dyn", None, 20, 2000, 2000, 64)]))
    assert kv["tokens_total"].tolist() == [20, 20]  # a missing batch is one sequence
    assert kv["unused_bytes"].tolist() == [1000, 0]
    assert kv["extra_bytes"].tolist() == [0, 64]
    assert (kv["token_state_bytes"] + kv["unused_bytes"] == kv["reserved_bytes"]).all()


def test_kv_token_bytes_is_the_median_per_token_position():
    kv = kv_table(
        _kv_trace(
            [
                (0, "a", 1, 10, 1000, 1000, 0),
                (1, "a", 1, 20, 2000, 4000, 0),
                (2, "a", 1, 0, 0, 512, 0),
                (3, "a", 1, 30, 6000, 6000, 0),
            ]
        )
    )
    assert kv_token_bytes(kv) == 100.0  # of 100, 100, 200; the row with no tokens is left out
    assert kv_token_bytes(kv[kv["tokens_total"] == 0]) is None
    assert kv_table(_kv_trace([])).empty


def test_kv_waste_averages_each_cache_over_its_steps():
    kv = kv_table(_kv_trace([(0, "k", 1, 1, 100, 300, 10), (1, "k", 1, 2, 200, 300, 30), (0, "v", 1, 1, 50, 50, 0)]))
    waste = kv_waste({"run-a": kv})
    assert list(waste.columns) == WASTE_COLUMNS
    assert waste.values.tolist() == [["run-a", "k", 150.0, 150.0, 20.0], ["run-a", "v", 50.0, 0.0, 0.0]]
    assert kv_waste({}).empty


def test_kv_summary_sets_each_cache_against_its_formula():
    # 2 layers x 2 x tokens x 2 kv_heads x 16 head_dim x 4 B x batch 3 = 1,536 B per token
    shape = dict(layers=2, kv_heads=2, head_dim=16, dtype_bytes=4, batch=3)
    rows = [
        (0, "dyn", 3, 5, 5 * 1536, 5 * 1536, 0),
        (1, "dyn", 3, 6, 6 * 1536, 6 * 1536, 0),
        (1, "half", 3, 6, 3 * 1536, 3 * 1536, 0),  # holds half what its shapes imply
        (0, "static", 3, 4, 4 * 1536, 10 * 1536, 0),
        (0, "bad", 3, 1, 1536, 1536, 0),
    ]
    shapes = {"dyn": shape, "half": shape, "static": shape, "bad": dict(shape, layers="2")}
    s = kv_summary(kv_table(_kv_trace(rows)), shapes).set_index("cache")
    assert list(s.reset_index().columns) == SUMMARY_COLUMNS
    assert s.loc["dyn", ["steps", "step", "tokens", "token_state_bytes"]].tolist() == [2, 1, 6, 6 * 1536]
    assert s.loc["dyn", "bytes_per_token"] == 512.0  # per token position: 1,536 B / batch 3
    assert (s.loc["dyn", "formula_bytes"], s.loc["dyn", "formula_matches"]) == (6 * 1536, True)
    assert (s.loc["half", "formula_bytes"], s.loc["half", "formula_matches"]) == (6 * 1536, False)
    assert s.loc["static", "formula_matches"] and s.loc["static", "reserved_bytes"] == 10 * 1536
    assert s.loc["bad", "shape"] is None and pd.isna(s.loc["bad", "formula_bytes"])  # malformed: no formula
    assert kv_summary(kv_table(_kv_trace(rows)), None)["formula_bytes"].isna().all()
    assert kv_summary(kv_table(_kv_trace([])), shapes).empty


@pytest.mark.parametrize("run", sorted((TRACES / "h100-ablation-kv").glob("ablate-kv-kv-*")))
def test_kv_of_a_bundled_run(run):
    kv = kv_table(load_trace(run, tables=("kv",)))
    if kv.empty:  # a run that keeps no cache
        assert kv_token_bytes(kv) is None
        return
    assert (kv["token_state_bytes"] + kv["unused_bytes"] == kv["reserved_bytes"]).all()
    assert kv_token_bytes(kv) > 0
    assert set(kv_waste({run.name: kv})["cache"]) == set(kv["cache"])


LIBRARY_FRAMES = pd.DataFrame(
    {
        "frame_id": [1, 2, 3, 4, 5],
        "filename": [
            "/opt/venv/lib/python3.12/site-packages/torch/nn/functional.py",
            "/src/model.py",
            "/opt/venv/lib/python3.12/site-packages/torch/nn/modules/module.py",
            "/work/main/profiler/capture/modules.py",
            "/src/train.py",
        ],
        "line": [3462, 168, 1775, 150, 40],
        "function": ["cross_entropy", "forward", "_call_impl", "_pre_forward", "main"],
    }
)
LIBRARY_STACKS = pd.DataFrame({"stack_id": [7, 8, 9], "frame_ids": [[1, 2, 3, 4, 5], [2, 3, 5], [3, 4]]})


def test_sites_name_the_users_line_first_and_the_library_call_it_made():
    from profiler.analysis.stacks import site_labels

    assert site_labels(LIBRARY_STACKS, LIBRARY_FRAMES) == {
        7: "model.py:168 forward > functional.py:3462 cross_entropy",
        8: "model.py:168 forward",
        9: "module.py:1775 _call_impl",  # no frame of the user's: the innermost one
    }


def test_site_breakdown_sums_sites_and_keeps_bytes_without_a_stack():
    from profiler.analysis.stacks import site_breakdown

    live = pd.DataFrame({"stack_id": [7, 8, 8, None], "size_bytes": [100, 30, 20, 5], "addr": [1, 2, 3, 4]})
    out = site_breakdown(live, LIBRARY_STACKS, LIBRARY_FRAMES)
    assert out["site"].tolist() == [
        "model.py:168 forward > functional.py:3462 cross_entropy",
        "model.py:168 forward",
        NO_STACK,
    ]
    assert out["total_bytes"].tolist() == [100, 50, 5] and out["count"].tolist() == [1, 2, 1]
    assert out["total_bytes"].sum() == live["size_bytes"].sum()


def test_folded_tree_keeps_the_users_frames_and_the_allocating_call():
    tree = stack_tree(_live([(7, 64)]), LIBRARY_STACKS, LIBRARY_FRAMES, fold=True)
    assert tree["label"].tolist() == ["train.py:40 main", "model.py:168 forward", "functional.py:3462 cross_entropy"]
    assert (tree["bytes"] == 64).all()
    unfolded = stack_tree(_live([(7, 64)]), LIBRARY_STACKS, LIBRARY_FRAMES)
    assert len(unfolded) == 5 and "modules.py:150 _pre_forward" in unfolded["label"].tolist()


def test_wrappers_inside_the_call_are_skipped():
    """dynamo's disable wrapper and module __call__ frames pass a call on: the site names the call."""
    from profiler.analysis.stacks import site_labels

    frames = pd.concat(
        [
            LIBRARY_FRAMES,
            pd.DataFrame(
                {
                    "frame_id": [6],
                    "filename": ["/opt/venv/lib/python3.12/site-packages/torch/_dynamo/eval_frame.py"],
                    "line": [1446],
                    "function": ["_fn"],
                }
            ),
        ],
        ignore_index=True,
    )
    stacks = pd.DataFrame({"stack_id": [1], "frame_ids": [[6, 1, 3, 2, 5]]})
    assert site_labels(stacks, frames) == {1: "model.py:168 forward > functional.py:3462 cross_entropy"}
    tree = stack_tree(_live([(1, 8)]), stacks, frames, fold=True)
    assert tree["label"].tolist() == ["train.py:40 main", "model.py:168 forward", "functional.py:3462 cross_entropy"]
