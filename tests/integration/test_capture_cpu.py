"""The CPU backend end to end, on the tiny GPT: accounting, steps, phases, attribution,
categories, and what a crash or an exception leaves behind.

The replay here is deliberately plain (a loop over events, the CUDA convention:
allocated bytes rise at alloc and drop at free_requested), so that it shares no
code with profiler.analysis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import profiler
from profiler.capture import session
from profiler.capture.cpu import CpuBackend
from profiler.trace import schema
from profiler.trace.reader import load_trace
from workloads.model import GPT, preset
from workloads.train import build, make_batch, train_step

REPO = Path(__file__).resolve().parents[2]


# -- helpers --------------------------------------------------------------------------


def _capture(tmp_path, steps, model=None, opt=None, name="tiny", optimizer="adamw", explicit_steps=False):
    torch.manual_seed(0)
    cfg = preset("tiny")
    if model is None:
        model, opt = build(cfg, optimizer=optimizer)
    with profiler.profile(out=tmp_path, name=name, backend="cpu") as prof:
        for _ in range(steps):
            train_step(model, opt, make_batch(cfg))
            if explicit_steps:
                prof.step()
    return load_trace(prof.run_dir), model, opt


def _replay(ev, baseline=0):
    """(bytes after each event, peak, index of the first event at the peak)."""
    cur = peak = baseline
    at = -1
    after = []
    for i, (a, s) in enumerate(zip(ev["action"].astype(str), ev["block_bytes"].tolist())):
        if a == "alloc":
            cur += s
        elif a == "free_requested":
            cur -= s
        after.append(cur)
        if cur > peak:
            peak, at = cur, i
    return after, peak, at


def _live_at(ev, index):
    """Category -> bytes of allocations alive just after event `index`."""
    live = {}
    rows = zip(
        ev["action"].astype(str)[: index + 1],
        ev["addr"][: index + 1],
        ev["block_bytes"][: index + 1],
        ev["category"].astype(str)[: index + 1],
    )
    for a, addr, s, c in rows:
        if a == "alloc":
            live[addr] = (s, c)
        elif a == "free_requested":
            live.pop(addr)
    out: dict[str, int] = {}
    for s, c in live.values():
        out[c] = out.get(c, 0) + s
    return out


def _alloc_for_role(ev, addr, event_index):
    """The alloc event live at `addr` at stream position `event_index` (its row label)."""
    allocs = ev[(ev["action"] == "alloc") & (ev["addr"] == addr)]
    allocs = allocs[allocs.index < event_index]
    return allocs.iloc[-1] if len(allocs) else None


class CheckpointedGPT(GPT):
    """The tiny GPT with every Block under torch.utils.checkpoint (non-reentrant)."""

    def forward(self, idx, targets=None):
        T = idx.size(1)
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        logits = self.lm_head(self.ln_f(x))
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def _checkpointed(optimizer="adamw"):
    torch.manual_seed(0)
    model = CheckpointedGPT(preset("tiny"))
    opt = (
        torch.optim.AdamW(model.parameters(), lr=3e-4)
        if optimizer == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.1)
    )
    return model, opt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three AdamW steps of the tiny GPT, steps found from the optimizer alone."""
    trace, model, opt = _capture(tmp_path_factory.mktemp("cpu"), steps=3)
    return trace, model, opt


# -- exact accounting -----------------------------------------------------------------


def test_replay_reproduces_peak_and_step_counters(tiny):
    trace, _, _ = tiny
    ev, meta = trace.events, trace.meta
    assert meta["backend"] == "cpu" and meta["status"] == "complete"
    assert meta["events_dropped"] == 0
    after, peak, _ = _replay(ev, meta["baseline_allocated_bytes"])
    assert min(after) >= 0
    assert peak == meta["max_allocated_bytes"] > 0
    # Each steps row holds the tracker's counters at the step's end: the replay after
    # the step's last event, byte for byte, and the running peak so far.
    last = ev.reset_index(drop=True).groupby("step").tail(1)
    at_end = {int(s): after[i] for s, i in zip(last["step"], last.index)}
    assert len(trace.steps) >= 3
    for row in trace.steps.itertuples():
        assert at_end[int(row.step)] == row.allocated_bytes, row
        end = max(i for s, i in zip(last["step"], last.index) if s <= row.step)
        assert max(after[: end + 1]) == row.max_allocated_bytes, row


def test_each_free_is_a_requested_then_completed_pair(tiny):
    trace, _, _ = tiny
    ev = trace.events.reset_index(drop=True)
    action = ev["action"].astype(str).tolist()
    req = [i for i, a in enumerate(action) if a == "free_requested"]
    done = [i for i, a in enumerate(action) if a == "free_completed"]
    assert len(req) == len(done) > 100
    assert done == [i + 1 for i in req]  # completed immediately after each request
    cols = ["ts_us", "addr", "size_bytes", "block_bytes", "step", "module", "phase", "category"]
    a = ev.loc[req, cols].astype(object).reset_index(drop=True)
    b = ev.loc[done, cols].astype(object).reset_index(drop=True)
    assert a.equals(b)


def test_online_counters_follow_the_replay_through_resize():
    """Storages resized in place (resize_, or FSDP-style storage.resize_(0)) are a free of
    the old bytes and an alloc of the new ones, and the counters follow the replay."""
    import pandas as pd

    backend = CpuBackend(stacks=False)
    backend.start()
    try:
        x = torch.empty(100, dtype=torch.float32)
        x.add_(1)
        x.resize_(1000)  # the storage grows in place: a free of 400 bytes, an alloc of 4000
        y = x * 2
        peak_with_y = backend.peak
        x.untyped_storage().resize_(0)  # not an op: seen at x's next use
        x.resize_(0)
        x.resize_(50)  # grows from nothing: an alloc only
        del x, y
    finally:
        backend.stop()
    cols = backend.drain(0)
    ev = pd.DataFrame({"action": cols["action"], "block_bytes": cols["size_bytes"]})
    after, peak, _ = _replay(ev)
    assert [(a, s) for a, s in zip(cols["action"], cols["size_bytes"]) if a != "free_completed"] == [
        ("alloc", 400),
        ("free_requested", 400),
        ("alloc", 4000),
        ("alloc", 4000),
        ("free_requested", 4000),
        ("alloc", 200),
        ("free_requested", 200),
        ("free_requested", 4000),
    ]
    assert after[-1] == backend.allocated == 0
    assert peak == backend.peak == peak_with_y == 8000


def test_parameters_are_pre_existing_state(tiny):
    """Parameters made before the capture are recorded when their model is first called:
    category parameter, no phase, no module, every byte once."""
    trace, model, _ = tiny
    ev = trace.events
    params = ev[(ev["action"] == "alloc") & (ev["category"] == "parameter")]
    assert params["size_bytes"].sum() == sum(p.nbytes for p in model.parameters())
    assert params["phase"].isna().all() and params["module"].isna().all()
    assert (params["step"] == 0).all()


# -- steps and phases ------------------------------------------------------------------


def test_steps_found_from_optimizer_steps(tiny):
    trace, _, _ = tiny
    steps = trace.steps["step"].tolist()
    assert steps[:3] == [0, 1, 2] and steps == sorted(set(steps))
    phases = trace.phases
    for s in (0, 1, 2):
        assert phases[phases["step"] == s]["phase"].astype(str).tolist() == ["forward", "backward", "optimizer"]
    assert set(trace.events["step"]) >= {0, 1, 2}


def test_explicit_step_takes_over_without_an_empty_step(tmp_path):
    trace, _, _ = _capture(tmp_path, steps=3, explicit_steps=True)
    assert trace.steps["step"].tolist() == [0, 1, 2]
    ev = trace.events
    for s in (0, 1, 2):
        in_step = ev[ev["step"] == s]
        assert (in_step["phase"] == "forward").any() and (in_step["phase"] == "optimizer").any()


def test_mark_creates_a_user_phase(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg)
    with profiler.profile(out=tmp_path, name="mark", backend="cpu") as prof:
        train_step(model, opt, make_batch(cfg))
        profiler.mark("eval")
        with torch.no_grad():
            model(*make_batch(cfg))
    trace = load_trace(prof.run_dir)
    assert "eval" in set(trace.phases["phase"].astype(str))
    ev = trace.events
    evals = ev[(ev["action"] == "alloc") & (ev["phase"] == "eval")]
    assert len(evals) > 10
    assert evals["module"].notna().mean() > 0.9
    assert "blocks.0.attn.qkv" in set(evals["module"].astype(str))


def test_category_stamps_kv_cache(tmp_path):
    with profiler.profile(out=tmp_path, name="kv", backend="cpu") as prof:
        with profiler.category("kv_cache"):
            cache = torch.zeros(2, 4, 32, 16)  # 16 KiB, a size nothing else has
        other = torch.ones(3, 5)
        del cache, other
    ev = load_trace(prof.run_dir).events
    kv = ev[(ev["action"] == "alloc") & (ev["category"] == "kv_cache")]
    assert kv["size_bytes"].tolist() == [2 * 4 * 32 * 16 * 4]
    other = ev[(ev["action"] == "alloc") & (ev["size_bytes"] == 60)]
    assert len(other) == 1 and other["category"].iloc[0] != "kv_cache"


def test_nested_categories_restore_the_outer_one_and_a_block_may_outlive_its_capture(tmp_path):
    with profiler.profile(out=tmp_path, name="nested", backend="cpu") as prof:
        with profiler.category("kv_cache"):
            outer = torch.zeros(7, 64)  # 1,792 B
            with profiler.category("temporary"):
                inner = torch.zeros(9, 64)  # 2,304 B
            after = torch.zeros(11, 64)  # 2,816 B: the outer category again
        block = profiler.category("kv_cache")
        block.__enter__()
    block.__exit__(None, None, None)  # the capture ended inside the block: a no-op, no error
    assert prof.failure is None
    ev = load_trace(prof.run_dir).events
    allocs = ev[ev["action"] == "alloc"].set_index("size_bytes")["category"].astype(str)
    assert (allocs[7 * 64 * 4], allocs[9 * 64 * 4], allocs[11 * 64 * 4]) == ("kv_cache", "temporary", "kv_cache")
    del outer, inner, after


def test_decorator_form(tmp_path):
    cfg = preset("tiny")
    torch.manual_seed(0)
    model, opt = build(cfg)

    @profiler.profile(out=tmp_path, name="deco", backend="cpu")
    def two_steps(n):
        for _ in range(n):
            train_step(model, opt, make_batch(cfg))
        return "done"

    assert two_steps(2) == "done"
    assert two_steps(1) == "done"  # each call is its own capture
    runs = list(tmp_path.iterdir())
    assert len(runs) == 2
    traces = [load_trace(r) for r in runs]
    assert all(t.status == "complete" and t.name == "deco" for t in traces)
    optimizer_steps = sorted(int((t.phases["phase"] == "optimizer").sum()) for t in traces)
    assert optimizer_steps == [1, 2]


# -- attribution -------------------------------------------------------------------------


def test_training_allocations_carry_a_module_or_the_optimizer(tiny):
    trace, _, _ = tiny
    ev = trace.events
    # Parameters pre-date the capture (CUDA's baseline blocks): not made by any step.
    allocs = ev[(ev["action"] == "alloc") & (ev["category"] != "parameter")]
    tagged = allocs["module"].notna() | (allocs["phase"] == "optimizer")
    share = allocs["size_bytes"][tagged].sum() / allocs["size_bytes"].sum()
    assert share >= 0.995, allocs[~tagged].groupby(["phase", "category"], observed=True)["size_bytes"].sum()


def test_each_gradient_carries_its_own_module(tiny):
    trace, _, _ = tiny
    ev, roles = trace.events, trace.roles
    grads = roles[roles["role"] == "gradient"]
    checked = 0
    for row in grads.itertuples():
        param = str(row.name)[: -len(".grad")]
        if param.startswith(("wte.", "lm_head.")):  # tied: either backward may allocate it
            continue
        alloc = _alloc_for_role(ev, row.addr, row.event_index)
        assert alloc is not None, row.name
        assert (alloc["phase"], alloc["module"], alloc["category"]) == (
            "backward",
            param.rsplit(".", 1)[0],
            "gradient",
        ), row.name
        checked += 1
    assert checked == 3 * 27  # three steps of every parameter but the tied embedding


def test_recompute_under_checkpoint_carries_checkpointed_modules(tmp_path):
    model, opt = _checkpointed()
    trace, _, _ = _capture(tmp_path, steps=1, model=model, opt=opt, name="ckpt")
    ev = trace.events
    recompute = ev[(ev["action"] == "alloc") & (ev["phase"] == "recompute")]
    assert recompute["size_bytes"].sum() > 0
    modules = set(recompute["module"].astype(str))
    assert all(m.startswith(("blocks.0", "blocks.1")) for m in modules), modules
    assert {"blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc"} <= modules


def test_checkpoint_every_step_has_a_forward_phase(tmp_path):
    model, opt = _checkpointed()
    trace, _, _ = _capture(tmp_path, steps=2, model=model, opt=opt, name="ckpt2")
    ph = trace.phases
    for s in (0, 1):
        assert "forward" in set(ph[ph["step"] == s]["phase"].astype(str)), s
    ev = trace.events
    step1 = ev[(ev["action"] == "alloc") & (ev["step"] == 1)]
    assert (step1["phase"] == "forward").any()


def test_checkpoint_gradients_carry_backward_and_their_module(tmp_path):
    model, opt = _checkpointed()
    trace, _, _ = _capture(tmp_path, steps=1, model=model, opt=opt, name="ckpt3")
    ev, roles = trace.events, trace.roles
    wrong = []
    for row in roles[roles["role"] == "gradient"].itertuples():
        param = str(row.name)[: -len(".grad")]
        if param.startswith(("wte.", "lm_head.")):
            continue
        alloc = _alloc_for_role(ev, row.addr, row.event_index)
        if (alloc["phase"], alloc["module"]) != ("backward", param.rsplit(".", 1)[0]):
            wrong.append((row.name, alloc["phase"], alloc["module"]))
    assert not wrong


# -- categories --------------------------------------------------------------------------


def test_sgd_without_momentum_has_no_optimizer_state(tmp_path):
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trace, _, _ = _capture(tmp_path, steps=2, model=model, opt=opt, name="sgd")
    assert not (trace.events["category"] == "optimizer_state").any()
    assert not (trace.roles["role"] == "optimizer_state").any()
    assert (trace.events["category"] == "gradient").any()


def test_adamw_state_is_twice_the_parameters(tiny):
    trace, model, opt = tiny
    ev = trace.events
    state = ev[(ev["action"] == "alloc") & (ev["category"] == "optimizer_state")]
    param_bytes = sum(p.nbytes for p in model.parameters())
    step_bytes = sum(s["step"].nbytes for s in opt.state.values() if torch.is_tensor(s["step"]))
    assert step_bytes <= 4 * len(opt.state)
    assert state["size_bytes"].sum() == 2 * param_bytes + step_bytes
    assert (state["phase"] == "optimizer").all() and (state["step"] == 0).all()


def test_checkpointing_lowers_activations_at_the_peak(tmp_path):
    """One SGD step each (the peak is then in backward, where activations live)."""
    torch.manual_seed(0)
    plain = GPT(preset("tiny"))
    plain_trace, _, _ = _capture(
        tmp_path, steps=1, model=plain, opt=torch.optim.SGD(plain.parameters(), lr=0.1), name="plain"
    )
    model, opt = _checkpointed(optimizer="sgd")
    ckpt_trace, _, _ = _capture(tmp_path, steps=1, model=model, opt=opt, name="ckpt-sgd")
    out = {}
    for key, trace in (("plain", plain_trace), ("ckpt", ckpt_trace)):
        _, peak, at = _replay(trace.events)
        out[key] = (peak, _live_at(trace.events, at).get("activation", 0))
    assert 0 < out["ckpt"][1] < 0.75 * out["plain"][1], out
    assert out["ckpt"][0] < out["plain"][0], out


# -- failure and crash safety --------------------------------------------------------------


def test_exception_finalizes_with_error_and_reraises_the_same_object(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg)
    boom = ValueError("boom at step 1")
    with pytest.raises(ValueError) as info:
        with profiler.profile(out=tmp_path, name="err", backend="cpu") as prof:
            train_step(model, opt, make_batch(cfg))
            model(*make_batch(cfg))
            raise boom
    assert info.value is boom
    trace = load_trace(prof.run_dir)
    assert trace.status == "error" and trace.from_journal == ()
    assert trace.meta["error"] == "ValueError: boom at step 1"
    assert set(trace.steps["step"]) == {0, 1}
    after, peak, _ = _replay(trace.events)
    assert peak == trace.meta["max_allocated_bytes"] and min(after) >= 0
    assert session.active() is None


CRASH_SCRIPT = textwrap.dedent("""
    import time
    import torch
    from workloads.model import preset
    from workloads.train import build, make_batch, train_step

    torch.manual_seed(0)
    cfg = preset("tiny")
    model, opt = build(cfg)
    for step in range(200):
        train_step(model, opt, make_batch(cfg))
        print(f"step {step}", flush=True)
        time.sleep(0.3)
""")


def test_sigkill_leaves_a_loadable_consistent_trace(tmp_path):
    script = tmp_path / "train_forever.py"
    script.write_text(CRASH_SCRIPT)
    out = tmp_path / "traces"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "profiler.cli", "run", "--backend", "cpu", "--out", str(out), str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line.strip())
            if line.strip() == "step 3":
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert seen[-1:] == ["step 3"], (seen, err[-2000:])
    assert proc.returncode == -signal.SIGKILL

    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1
    run = runs[0]
    meta = json.loads((run / "meta.json").read_text())  # written atomically: always whole
    assert "status" not in meta
    for table in schema.TABLE_NAMES:  # a final name is absent or a whole file
        path = run / schema.parquet_name(table)
        if path.exists():
            pq.read_table(path)

    trace = load_trace(run)
    assert trace.status == "running" and "events" in trace.from_journal
    assert set(trace.steps["step"]) >= {0, 1, 2}
    ev = trace.events.reset_index(drop=True)
    live = {}
    cur = 0
    for a, addr, s in zip(ev["action"].astype(str), ev["addr"], ev["block_bytes"]):
        if a == "alloc":
            assert addr not in live
            live[addr] = s
            cur += s
        elif a == "free_requested":
            assert live.pop(addr) == s
            cur -= s
        assert cur >= 0
    after, _, _ = _replay(ev)
    last = ev.groupby("step").tail(1)
    at_end = {int(s): after[i] for s, i in zip(last["step"], last.index)}
    for row in trace.steps.itertuples():
        if int(row.step) in at_end:
            assert at_end[int(row.step)] == row.allocated_bytes, row
