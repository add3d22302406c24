"""The continuous-batching scenario (workloads/serving.py) on CPU with the tiny GPT."""

from __future__ import annotations

import time

import pytest
import torch

from profiler.trace.reader import load_trace
from workloads import serving
from workloads.serving import ServingConfig, compare, format_table, make_requests

TOKEN_BYTES = 2 * 2 * 2 * 32 * 4  # tiny: layers x (K, V) x heads x head_dim x fp32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = compare(ServingConfig())
    yield out, time.perf_counter() - t0
    torch.set_num_threads(n)


def test_runs_in_a_few_seconds(rows):
    _, seconds = rows
    assert seconds < 15


def test_paged_holds_more_token_states_than_contiguous(rows):
    (contiguous, paged), _ = rows
    assert (contiguous["mode"], paged["mode"]) == ("contiguous", "paged")
    assert paged["token_state_frac"] > contiguous["token_state_frac"]
    assert paged["mean_reserved_bytes"] < contiguous["mean_reserved_bytes"]
    # Contiguous slack is unused reservation; paged slack is the tail of the last block.
    assert contiguous["frag_frac"] == 0 and paged["unused_frac"] == 0
    for r in (contiguous, paged):
        assert r["token_state_frac"] + r["unused_frac"] + r["frag_frac"] == pytest.approx(1)
        assert r["mean_allocator_free_bytes"] is None  # CPU: no caching allocator


def test_both_modes_serve_the_same_stream_identically(rows):
    (contiguous, paged), _ = rows
    cfg = ServingConfig()
    assert contiguous["requests"] == paged["requests"] == cfg.requests
    assert contiguous["tokens"] == paged["tokens"] == sum(r.output_len for r in make_requests(cfg))
    assert contiguous["steps"] == paged["steps"]
    assert contiguous["outputs_match"] and paged["outputs_match"]
    # max_batch slots of max_len positions, allocated once.
    assert contiguous["peak_reserved_bytes"] == cfg.max_batch * cfg.max_len * TOKEN_BYTES
    table = format_table([contiguous, paged])
    assert "contiguous" in table and "paged" in table and "n/a" in table


def test_request_stream_is_seeded():
    a, b = make_requests(ServingConfig(seed=3)), make_requests(ServingConfig(seed=3))
    assert [(r.arrival, r.output_len) for r in a] == [(r.arrival, r.output_len) for r in b]
    assert all(torch.equal(x.prompt, y.prompt) for x, y in zip(a, b))
    lens = {r.prompt.shape[1] for r in a} | {r.output_len for r in a}
    assert len(lens) > 5  # mixed lengths


def test_captured_serving_records_kv_per_step(tmp_path):
    cfg = ServingConfig(requests=6, max_batch=3)
    rows = compare(cfg, out=str(tmp_path))
    for r in rows:
        trace = load_trace(r["run_dir"])
        kv = trace.kv.sort_values("step")
        assert kv["step"].tolist() == list(range(r["steps"]))
        ev = trace.events
        assert ((ev["action"] == "alloc") & (ev["category"] == "kv_cache")).any()
    paged = load_trace(rows[1]["run_dir"]).kv
    assert (paged["reserved_bytes"] % (cfg.block_size * TOKEN_BYTES) == 0).all()
    assert (paged["reserved_bytes"] >= paged["token_state_bytes"]).all()


def test_main_prints_a_table(capsys):
    serving.main(["--device", "cpu", "--requests", "4", "--max-batch", "2"])
    out = capsys.readouterr().out
    assert "token states" in out and "paged" in out
