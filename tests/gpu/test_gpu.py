"""Accuracy on a real GPU: run with `pytest -m gpu` on a CUDA machine.

The workload is the gpt2-small preset in bf16 autocast with fused AdamW, batch
8 x 1024. Results worth quoting are printed (run pytest with -s) and, when
VRAMSCOPE_RESULTS is set, written there as JSON.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu_oracle import allocated_at_step_ends, categories_alive_at, load_events, replay

from profiler.trace.reader import load_trace

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
REPO = Path(__file__).resolve().parents[2]


def _save(name: str, data) -> None:
    print(f"\n[{name}] {json.dumps(data, indent=1, default=str)}")
    out = os.environ.get("VRAMSCOPE_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))


def _fresh_gpu():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _gpt_step_fn(steps: int):
    from workloads.model import preset
    from workloads.train import build, make_batch, train_step

    cfg = preset("gpt2-small")
    torch.manual_seed(0)
    model, opt = build(cfg, device="cuda", fused=True)
    batch = make_batch(cfg, device="cuda")

    def run():
        for _ in range(steps):
            train_step(model, opt, batch, autocast_dtype=torch.bfloat16).item()

    return model, opt, run


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    import profiler

    _fresh_gpu()
    # Once dynamo has compiled in a process, the capture keeps module hooks as they are (a
    # change would recompile): forget earlier tests' compiles, so that this eager run samples.
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    model, opt, run = _gpt_step_fn(steps=6)
    out = tmp_path_factory.mktemp("traces")
    # Steps 0-1 run module hooks (and a step after a new peak); the rest borrow attribution
    # from a hooked step with the same allocation sites.
    with profiler.profile(out=out, name="gpt2-small-bf16", hooked_steps=(2, 50)) as prof:
        run()
    torch_peak = torch.cuda.max_memory_allocated()
    del model, opt
    _fresh_gpu()
    return prof.run_dir, torch_peak


def test_replay_reproduces_allocator_peak(gpt_run):
    run_dir, torch_peak = gpt_run
    ev, meta = load_events(run_dir)
    peak, _ = replay(ev, meta["baseline_allocated_bytes"])
    peak_completed, _ = replay(ev, meta["baseline_allocated_bytes"], release="free_completed")
    _save(
        "exact_accounting",
        dict(
            events=len(ev),
            baseline=meta["baseline_allocated_bytes"],
            replayed_peak=peak,
            replayed_peak_free_completed=peak_completed,
            meta_max_allocated=meta["max_allocated_bytes"],
            torch_max_memory_allocated=torch_peak,
            dropped=meta["events_dropped"],
            device=meta["device"],
            torch=meta["torch_version"],
        ),
    )
    assert meta["events_dropped"] == 0
    assert peak == peak_completed == meta["max_allocated_bytes"] == torch_peak


def test_replay_matches_allocator_at_every_step(gpt_run):
    """At each step boundary, replayed bytes equal memory_stats()' allocated_bytes.current."""
    import pyarrow.parquet as pq

    run_dir, _ = gpt_run
    ev, meta = load_events(run_dir)
    steps = pq.read_table(run_dir / "steps.parquet").to_pandas()
    replayed = allocated_at_step_ends(ev, meta["baseline_allocated_bytes"])
    rows = [(int(s), replayed.get(int(s)), int(a)) for s, a in zip(steps["step"], steps["allocated_bytes"])]
    _save("step_counters", dict(rows=rows, block_replay_misses=meta.get("block_replay_misses")))
    assert meta.get("block_replay_misses") == 0
    assert all(r == a for _, r, a in rows if r is not None)


def test_allocations_carry_module_or_optimizer(gpt_run):
    run_dir, _ = gpt_run
    ev, _ = load_events(run_dir)
    allocs = ev[ev["action"] == "alloc"]
    tagged = allocs["module"].notna() | (allocs["phase"] == "optimizer")
    share = allocs["size_bytes"][tagged].sum() / allocs["size_bytes"].sum()
    untagged = allocs[~tagged].groupby(["phase", "category"], observed=True)["size_bytes"].sum()
    per_step = {
        int(s): float(g["size_bytes"][tagged[g.index]].sum() / g["size_bytes"].sum()) for s, g in allocs.groupby("step")
    }
    meta = json.loads((run_dir / "meta.json").read_text())
    _save(
        "attribution",
        dict(
            tagged_share=float(share),
            per_step=per_step,
            steps_from_template=meta.get("steps_from_template"),
            untagged_bytes={str(k): int(v) for k, v in untagged.items()},
        ),
    )
    assert share >= 0.995
    assert meta.get("steps_from_template", 0) >= 3


def test_backward_allocations_carry_their_module(gpt_run):
    """A weight's gradient is made by its own module's backward, so it must carry that module."""
    import pyarrow.parquet as pq

    run_dir, _ = gpt_run
    ev, _ = load_events(run_dir)
    roles = pq.read_table(run_dir / "roles.parquet").to_pandas()
    steps = pq.read_table(run_dir / "steps.parquet").to_pandas()
    unhooked = int(steps["step"][~steps["modules_hooked"].astype(bool) & (steps["step"] < 5)].max())
    checked = wrong = 0
    for step in (0, unhooked):  # a hooked step and one attributed from a template
        c, w = _check_gradient_modules(ev, roles, step)
        checked, wrong = checked + c, wrong + w
    _save("backward_attribution", dict(gradients_checked=checked, wrong=wrong))
    assert checked > 200 and wrong == 0


def test_a_longer_batch_outside_the_hooked_steps_is_attributed(tmp_path):
    """The tiny GPT on CUDA, accumulating 2 micro-batches; step 7's are 4x longer and set the
    peak. The same loop runs sampled and fully hooked, each in a fresh process (so lazily made
    cuBLAS workspaces come in both alike): per (module, phase, category), the bytes alive at the
    peak must agree, or the sampled run's must have no module. Never a label the full run lacks."""
    import pandas as pd

    from profiler.trace.reader import load_trace

    script = tmp_path / "long_batch.py"
    script.write_text(_LONG_BATCH_SCRIPT)
    runs = {}
    for name, hooked in (("sampled", "3,50"), ("full", "all")):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "profiler.cli", "run", "--out", str(out), "--hooked-steps", hooked, str(script)]
        subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
        (run_dir,) = [p.parent for p in out.rglob("meta.json")]
        runs[name] = load_trace(run_dir)
    mine, truth = (_bytes_by_label(runs[n]) for n in ("sampled", "full"))
    diff = pd.concat({"sampled": mine, "full": truth}, axis=1).fillna(0).astype("int64")
    differ = diff[diff["sampled"] != diff["full"]]
    named = float(mine[mine.index.get_level_values("module") != "-"].sum() / mine.sum())
    _save("sampled_peak", dict(named_share=named, differing=differ.reset_index().to_dict("records")))
    print(f"\nbytes at the peak per (module, phase, category) that differ:\n{differ.to_string()}")
    gained = differ[differ["sampled"] > differ["full"]]
    assert set(gained.index.get_level_values("module")) <= {"-"}, differ.to_string()
    assert int(mine.sum()) == int(truth.sum())


_LONG_BATCH_SCRIPT = """
import torch
from workloads.model import GPT, preset

torch.manual_seed(0)
cfg = preset("tiny")
model = GPT(cfg).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
g = torch.Generator(device="cuda").manual_seed(1)
for step in range(10):
    for _ in range(2):
        idx = torch.randint(cfg.vocab_size, (4, 64 if step == 7 else 16), device="cuda", generator=g)
        (model(idx, idx)[1] / 2).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
"""


def _bytes_by_label(trace):
    """Bytes alive at the peak per (module, phase, category); "-" for none."""
    from profiler.analysis.live import alive_at_peak

    live = alive_at_peak(trace)[["module", "phase", "category", "size_bytes"]].copy()
    for c in ("module", "phase", "category"):
        live[c] = live[c].astype(object).where(live[c].notna(), "-")
    return live.groupby(["module", "phase", "category"])["size_bytes"].sum()


def _check_gradient_modules(ev, roles, step):
    grads = roles[(roles["role"] == "gradient") & (roles["step"] == step)]
    allocs = ev[(ev["action"] == "alloc") & (ev["phase"] == "backward") & (ev["step"] == step)]
    module_of = dict(zip(allocs["addr"], allocs["module"].astype(str)))
    checked = wrong = 0
    for addr, name in zip(grads["addr"], grads["name"].astype(str)):
        param = name[: -len(".grad")]
        if param.startswith("wte."):  # tied with lm_head: either backward may allocate it
            continue
        expected = param.rsplit(".", 1)[0]
        checked += 1
        if module_of.get(addr) != expected:
            wrong += 1
            print("mismatch", step, name, module_of.get(addr))
    return checked, wrong


def test_categories_agree_with_memtracker():
    """One step each, fresh model each: categories at the peak within 2%."""
    import pyarrow.parquet as pq
    from torch.distributed._tools.mem_tracker import MemTracker

    import profiler

    _fresh_gpu()
    model, opt, run = _gpt_step_fn(steps=1)
    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        run()
    theirs = {
        str(getattr(k, "value", k)): int(v) for k, v in mt.get_tracker_snapshot("peak")[torch.device("cuda", 0)].items()
    }
    del model, opt, mt, run
    _fresh_gpu()

    model, opt, run = _gpt_step_fn(steps=1)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "vramscope-mt"
    with profiler.profile(out=out, name="memtracker-compare") as prof:
        run()
    del model, opt, run
    _fresh_gpu()
    ev, meta = load_events(prof.run_dir)
    seg = pq.read_table(prof.run_dir / "segments.parquet").to_pandas()
    _, at = replay(ev, meta["baseline_allocated_bytes"])
    ours = categories_alive_at(ev, seg, at)
    pairs = {
        "parameter": "Parameter",
        "optimizer_state": "Optstate",
        "activation": "Activation",
        "temporary": "Temp",
        "gradient": "Gradient",
    }
    table = {c: dict(vramscope=ours.get(c, 0), memtracker=theirs.get(m, 0)) for c, m in pairs.items()}
    for row in table.values():
        row["diff_pct"] = 100.0 * (row["vramscope"] - row["memtracker"]) / max(row["memtracker"], 1)
    _save("memtracker", dict(table=table, memtracker_raw=theirs, vramscope_raw=ours, peak_event_index=at))
    for c in ("parameter", "optimizer_state", "activation", "temporary"):
        if table[c]["memtracker"] or table[c]["vramscope"]:
            assert abs(table[c]["diff_pct"]) <= 2.0, (c, table[c])


OOM_SCRIPT = """
import torch
from torch import nn
net = nn.Linear(1024, 1024).cuda()
hold = []
while True:  # grow until the card is full
    hold.append(torch.empty(2 << 30, dtype=torch.uint8, device="cuda"))
    net(torch.randn(8, 1024, device="cuda")).sum().backward()
"""


def test_oom_under_vramscope_run(tmp_path):
    script = tmp_path / "oom_script.py"
    script.write_text(OOM_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "profiler.cli", "run", "--out", str(tmp_path / "t"), str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    print(proc.stderr[-2000:])
    runs = list((tmp_path / "t").iterdir())
    assert len(runs) == 1
    meta = json.loads((runs[0] / "meta.json").read_text())
    ev, _ = load_events(runs[0])
    import pyarrow.parquet as pq

    seg = pq.read_table(runs[0] / "segments.parquet").to_pandas()
    _save(
        "oom",
        dict(
            returncode=proc.returncode,
            stderr_tail=proc.stderr.strip().splitlines()[-2:],
            status=meta["status"],
            oom=meta.get("oom"),
            oom_events=int((ev["action"] == "oom").sum()),
            oom_segment_rows=int((seg["snapshot"] == "oom").sum()),
        ),
    )
    assert proc.returncode != 0
    assert "OutOfMemoryError" in proc.stderr
    assert meta["status"] == "oom"
    assert (ev["action"] == "oom").sum() >= 1
    assert (seg["snapshot"] == "oom").sum() > 0
    from profiler import report

    facts = report.build_report(load_trace(runs[0]))
    assert facts["run"]["oom"] == meta["oom"]
    assert any(line.startswith("  out of memory: ") for line in report.render(facts).splitlines()[:6])


def _replayed_peak(run_dir) -> int:
    ev, meta = load_events(run_dir)
    return int(replay(ev, meta["baseline_allocated_bytes"])[0])


def test_full_ring_is_counted_not_silent(tmp_path):
    """torch's history (capture_path python) keeps `max_entries` between drains: a ring too small
    for the interval loses entries, and meta counts them. The native tracker has no ring: with
    the same settings it keeps every entry, and the replay stays exact."""
    import profiler

    kept = {}
    for path in ("python", "native"):
        _fresh_gpu()
        model, opt, run = _gpt_step_fn(steps=1)
        with profiler.profile(
            out=tmp_path, name=f"tiny-ring-{path}", max_entries=500, drain_interval_s=3600, capture_path=path
        ) as prof:
            run()
        torch_peak = torch.cuda.max_memory_allocated()
        del model, opt, run
        _fresh_gpu()
        meta = json.loads((prof.run_dir / "meta.json").read_text())
        kept[path] = dict(
            capture_path=meta["capture_path"],
            events_kept=meta["event_count"],
            events_dropped=meta["events_dropped"],
            replay_peak=_replayed_peak(prof.run_dir),
            torch_peak=torch_peak,
        )
    _save("ring_drops", dict(max_entries=500, **kept))
    assert kept["python"]["capture_path"] == "python" and kept["python"]["events_dropped"] > 0
    assert kept["native"]["capture_path"] == "native" and kept["native"]["events_dropped"] == 0
    assert kept["native"]["events_kept"] > 500 and kept["native"]["replay_peak"] == kept["native"]["torch_peak"]


def test_native_step_counters_are_the_allocators_and_event_times_unix_microseconds():
    """A step row's counters, read by the tracker, equal torch's memory_stats at the same point;
    event times (the allocator's clock ticks, turned at the drain) fall inside the wall-clock
    readings around them."""
    import time

    from profiler.capture.cuda import CudaBackend
    from profiler.capture.native_cuda import make_native_backend

    backend, error = make_native_backend(stacks=True)
    if backend is None:
        pytest.skip(f"the native tracker does not build here: {error}")
    backend.start()
    try:
        before = time.time_ns() // 1000
        kept = [torch.empty(1 << 20, device="cuda") for _ in range(4)]
        del kept[1]
        after = time.time_ns() // 1000
        native, torch_row = backend.stats_row(), CudaBackend.stats_row(backend)
        cols = backend.drain(step=0)
    finally:
        backend.stop()
    _save("native_counters", dict(native=native, torch=torch_row, ts_us=[before, after]))
    assert native == torch_row
    ts = cols["ts_us"].tolist()
    assert len(ts) >= 6 and all(before - 1000 <= t <= after + 1000 for t in ts) and ts == sorted(ts)
    assert backend.dropped == 0


# -- torch.compile: layer names from inductor's generated code -------------------------


def _compile_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def _compiled_gpt_steps(steps: int, out=None):
    """A fresh nanoGPT GPT-2 small, compiled, trained `steps` steps (B=8x1024, bf16 autocast,
    fused AdamW), under a capture when `out` is given. Returns the run directory, the
    compile counts (frames, graphs) before the first step, after it and after the last,
    and the allocator's peak."""
    from nanogpt import batch, gpt2_small, train

    import profiler

    _fresh_gpu()
    torch.manual_seed(0)
    model = gpt2_small().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=True)
    cmodel = torch.compile(model)
    inputs, targets = batch(model, batch_size=8, device="cuda")
    capture = profiler.profile(out=out, name="gpt2-small-compiled") if out is not None else contextlib.nullcontext()
    counts = [_compile_counts()]
    with capture as prof:
        train(cmodel, opt, 1, inputs, targets, torch.bfloat16)
        counts.append(_compile_counts())
        train(cmodel, opt, steps - 1, inputs, targets, torch.bfloat16)
        counts.append(_compile_counts())
    peak = torch.cuda.max_memory_allocated()
    del model, opt, cmodel
    _fresh_gpu()
    return (prof.run_dir if out is not None else None), counts, peak


def _gib(n) -> str:
    return f"{n / 2**30:.3f} GiB"


def _attribution_at_peak(trace) -> dict:
    """Bytes alive at the peak that carry a module and a phase, or are parameters and
    optimizer state (which carry their category and the optimizer phase)."""
    import pandas as pd

    from profiler.analysis.live import alive_at_peak, breakdown
    from profiler.analysis.stacks import site_labels

    everything = alive_at_peak(trace)
    kept = everything["category"].isin(["parameter", "optimizer_state"]) | (everything["phase"] == "optimizer")
    # Blocks made before the capture that no role names (the batch, tensors an earlier test
    # left alive) are not the capture's to name: counted apart, so the share does not
    # depend on what ran before in the process.
    before = (everything["alloc_index"] < 0) & ~kept
    live, kept = everything[~before], kept[~before]
    total = int(live["size_bytes"].sum())
    named = live["module"].notna() & live["phase"].notna()
    top = breakdown(live[named], "module").head(8)
    # What the share misses, grouped so that a failure names its cause: the phase and
    # category the blocks carry, the step that made them and where (innermost user site).
    rest = live[~(named | kept)].copy()
    sites = site_labels(trace.stacks, trace.frames) if trace.stacks is not None else {}
    rest["site"] = [sites.get(int(s)) if pd.notna(s) else None for s in rest["stack_id"]]
    steps = trace.events["step"].to_numpy()
    rest["step"] = [int(steps[i]) if i >= 0 else None for i in rest["alloc_index"]]
    missed = breakdown(rest, ["phase", "category", "module", "step", "site"]).head(12)
    return dict(
        blocks=len(live),
        before_capture_bytes=int(everything["size_bytes"][before].sum()),
        share=float(live["size_bytes"][named | kept].sum()) / total,
        root_share=float(live["size_bytes"][live["module"] == "GPT"].sum()) / total,
        top={str(m): int(b) for m, b in zip(top["module"], top["total_bytes"])},
        missed=missed.drop(columns="share").to_dict("records"),
    )


def _block_bytes(ev, block: str, step: int) -> dict:
    """Bytes one block allocated in one step, by phase."""
    allocs = ev[(ev["action"] == "alloc") & (ev["step"] == step)]
    mine = allocs["module"].astype(str).str.startswith(block + ".") | (allocs["module"] == block)
    by_phase = allocs[mine].groupby("phase", observed=True)["size_bytes"].sum()
    return {str(p): int(by_phase.get(p, 0)) for p in {*map(str, by_phase.index), "forward", "backward"}}


def test_compiled_gpt_names_its_layers_at_the_peak(tmp_path):
    """A plain compiled model first, then a fresh one under the capture, in one process:
    the capture's layer names come from the line maps of the plain run's compile."""
    from profiler.analysis.timeline import peak
    from profiler.trace.reader import load_trace

    _, plain, _ = _compiled_gpt_steps(5)
    run_dir, captured, torch_peak = _compiled_gpt_steps(20, tmp_path)
    # [frames, graphs] compiled by the end of step 1, then by the end of the run
    delta = {
        n: [c[i] - cs[0][i] for c in cs[1:] for i in (0, 1)] for n, cs in (("plain", plain), ("captured", captured))
    }
    trace = load_trace(run_dir)
    meta = json.loads((run_dir / "meta.json").read_text())
    at_peak = _attribution_at_peak(trace)
    block = _block_bytes(trace.events, "transformer.h.5", step=10)
    replay_peak = peak(trace).allocated_bytes
    modules = set(trace.events["module"].dropna().astype(str))
    print(f"\ncompile: peak {_gib(replay_peak)} replayed, {_gib(torch_peak)} max_memory_allocated")
    print(
        f"compile: attributed at the peak {100 * at_peak['share']:.2f}% of {at_peak['blocks']} blocks' bytes "
        f"(root GPT alone {100 * at_peak['root_share']:.1f}%; {_gib(at_peak['before_capture_bytes'])} made "
        "before the capture left out)"
    )
    print("compile: top modules at the peak: " + ", ".join(f"{m} {_gib(b)}" for m, b in at_peak["top"].items()))
    print(f"compile: transformer.h.5 allocated in step 10: {block}")
    print(f"compile: [frames, graphs] compiled by step 1 and by the end: {delta}")
    print(f"compile: hook {meta.get('compile_attribution')} errors {meta.get('compile_attribution_errors')}")
    print("compile: not attributed at the peak: " + json.dumps(at_peak["missed"], default=str))
    _save("compiled_attribution", dict(at_peak, block=block, compiles=delta, peak=replay_peak, torch_peak=torch_peak))
    assert replay_peak == torch_peak
    assert at_peak["share"] >= 0.99
    assert not {m for m in modules if "_orig_mod" in m or "OptimizedModule" in m}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.11.mlp.c_fc", "lm_head"} <= modules
    assert block["forward"] > 0 and block["backward"] > 0
    # The captured model is a fresh one of the same code: dynamo may reuse the plain run's
    # compile, and the capture adds none (nothing after step 1, no more than the plain run).
    assert delta["captured"][:2] == delta["captured"][2:]
    assert all(c <= p for c, p in zip(delta["captured"], delta["plain"]))
    attribution = meta["compile_attribution"]  # maps made in the capture, before it, or from the store
    assert "compile_attribution_errors" not in meta
    assert attribution["graphs"] + attribution["graphs_before"] + attribution["graphs_stored"] >= 2


def _kv_alive_after(events, step: int | None = None) -> int:
    """Requested bytes of kv_cache allocations alive after `step`'s events (after all: None)."""
    live: dict[int, int] = {}
    for action, addr, size, s, cat in zip(
        events["action"].astype(str),
        events["addr"],
        events["size_bytes"],
        events["step"],
        events["category"].astype(str),
    ):
        if step is not None and s > step:
            break
        if action == "alloc" and cat == "kv_cache":
            live[addr] = size
        elif action == "free_requested":
            live.pop(addr, None)
    return sum(live.values())


def test_generate_kv_cache_exact_on_cuda(tmp_path):
    """An unmodified generate() on a bf16 Llama: one step per forward, KV bytes to the formula."""
    transformers = pytest.importorskip("transformers")
    import profiler
    from profiler.trace.reader import load_trace

    layers, hidden, heads, kv_heads, vocab = 4, 256, 8, 4, 1024
    batch, prompt, new, bf16 = 4, 16, 32, 2
    head_dim = hidden // heads

    def formula(tokens: int) -> int:
        return layers * 2 * tokens * kv_heads * head_dim * bf16 * batch

    _fresh_gpu()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
    )
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
    with profiler.profile(out=tmp_path, name="generate-kv") as prof:
        out = model.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, return_dict_in_generate=True
        )
        torch.cuda.synchronize()
    assert out.sequences.shape == (batch, prompt + new)
    trace = load_trace(prof.run_dir)
    steps = trace.steps["step"].tolist()
    kv = trace.kv.sort_values("step")
    expect = [formula(prompt + s) for s in range(new)]
    measured = kv["token_state_bytes"].tolist()
    alive = [_kv_alive_after(trace.events, s) for s in range(new)]
    final = formula(prompt + new - 1)
    alive_end = _kv_alive_after(trace.events)
    rows_ok = sum(a == b for a, b in zip(measured, expect))
    alive_ok = sum(a == b for a, b in zip(alive, expect))
    print(f"\n[generate_kv] steps {len(steps)} (max_new_tokens {new}: the prefill and {new - 1} decodes)")
    print(f"[generate_kv] kv rows {len(kv)}; tokens {kv['tokens'].iloc[0]}..{kv['tokens'].iloc[-1]}")
    print(f"[generate_kv] token-state bytes == formula at {rows_ok}/{new} steps")
    print(f"[generate_kv] kv_cache bytes alive at step ends == formula at {alive_ok}/{new} steps")
    print(f"[generate_kv] kv_cache bytes alive at the end {alive_end:,} B, formula {final:,} B")
    _save(
        "generate_kv", dict(steps=len(steps), kv_rows=len(kv), measured=measured, formula=expect, alive_end=alive_end)
    )
    del model, out
    _fresh_gpu()
    assert steps == list(range(new))
    assert kv["step"].tolist() == list(range(new))
    assert kv["tokens"].tolist() == [prompt + s for s in range(new)]
    assert measured == expect
    assert alive == expect
    assert alive_end == final


def test_estimate_of_a_cuda_run_without_a_preset(tmp_path):
    """estimate --trace on any run: parameters and AdamW moments predicted from the run's own tensors;
    the allocator rounds each to 512 B blocks. Steps are the optimizer's; the workspace counts on CUDA."""
    import profiler
    from profiler.analysis.summary import step_counts
    from profiler.estimate import DEFAULT_WORKSPACE, workspace_bytes_for
    from profiler.estimate_trace import compare_with_trace

    _fresh_gpu()
    with profiler.profile(out=tmp_path, name="mlp", backend="cuda") as prof:
        model = torch.nn.Sequential(torch.nn.Linear(100, 300), torch.nn.GELU(), torch.nn.Linear(300, 7)).cuda()
        opt = torch.optim.AdamW(model.parameters())  # foreach: the step counts stay on the CPU
        for _ in range(3):
            model(torch.randn(16, 100, device="cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    trace = load_trace(prof.run_dir)
    params = list(model.parameters())
    nbytes = sum(p.numel() * 4 for p in params)
    blocks = sum(-(-p.numel() * 4 // 512) * 512 for p in params)
    rows = {(r.level, r.name): r for r in compare_with_trace(trace).itertuples()}
    _save("estimate_cuda", {f"{k[0]}:{k[1]}": (r.measured_bytes, r.predicted_bytes) for k, r in rows.items()})
    assert step_counts(trace)[0] == 3 and workspace_bytes_for(trace.meta) == DEFAULT_WORKSPACE
    assert rows[("held", "parameter")].predicted_bytes == nbytes
    assert rows[("held", "parameter")].measured_bytes == blocks
    moments = [rows[("state", s)] for s in ("exp_avg", "exp_avg_sq")]
    assert [r.measured_bytes for r in moments] == [r.predicted_bytes for r in moments] == [nbytes, nbytes]
    assert ("state", "step") not in rows
    assert rows[("held", "optimizer_state")].measured_bytes >= 2 * blocks
