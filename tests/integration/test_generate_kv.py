"""transformers generate() under a capture, with no change to the script: its KV cache and its steps.

A tiny Llama built from a LlamaConfig (random weights) generates greedily; the trace must
have one step per forward (the prefill, then each decode), one kv row per step, and
token-state bytes equal to layers x 2 x tokens x kv_heads x head_dim x dtype_bytes x batch
exactly; what the allocator saw allocated under kv_cache must be those bytes too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import profiler
from profiler.report import build_report, render
from profiler.trace.reader import load_trace

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB = 2, 64, 4, 2, 128
HEAD_DIM, F32 = HIDDEN // HEADS, 4
BATCH, PROMPT, NEW = 2, 5, 6

pytestmark = pytest.mark.usefixtures("one_thread")


def kv_formula(tokens: int, batch: int = BATCH) -> int:
    return LAYERS * 2 * tokens * KV_HEADS * HEAD_DIM * F32 * batch


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def generate(out, name, hooked_steps=(3, 50), **kwargs):
    """Greedy generate() under profiler.profile on the CPU backend; returns (trace, output)."""
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    with profiler.profile(out=out, name=name, backend="cpu", hooked_steps=hooked_steps) as prof:
        # min_new_tokens: no early end of sequence. The output keeps the cache alive past the
        # capture's end, so that its final tensors are live there.
        output = model.generate(
            ids,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            **kwargs,
        )
    return load_trace(prof.run_dir), output


def cache_of(output):
    """generate()'s cache (`cache` in newer transformers, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def kv_alive(events, upto_step: int | None = None) -> int:
    """Bytes of kv_cache allocations still alive after the events of `upto_step` (all: None)."""
    live: dict[int, int] = {}
    for action, addr, size, step, cat in zip(
        events["action"].astype(str),
        events["addr"],
        events["size_bytes"],
        events["step"],
        events["category"].astype(str),
    ):
        if upto_step is not None and step > upto_step:
            break
        if action == "alloc" and cat == "kv_cache":
            live[addr] = size
        elif action == "free_requested":
            live.pop(addr, None)
    return sum(live.values())


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("traces"), "dynamic")


def test_one_step_per_forward(dynamic):
    trace, output = dynamic
    assert output.sequences.shape == (BATCH, PROMPT + NEW)
    assert trace.steps["step"].tolist() == list(range(NEW))
    assert trace.steps["modules_hooked"].tolist() == [True] * 3 + [False] * (NEW - 3)
    assert set(trace.events["step"]) == set(range(NEW))


def test_kv_rows_follow_the_formula_at_every_step(dynamic):
    trace, _ = dynamic
    kv = trace.kv.sort_values("step")
    assert kv["step"].tolist() == list(range(NEW))
    assert set(kv["cache"]) == {"DynamicCache"} and set(kv["batch"]) == {BATCH}
    assert kv["tokens"].tolist() == [PROMPT + s for s in range(NEW)]
    assert kv["token_state_bytes"].tolist() == [kv_formula(PROMPT + s) for s in range(NEW)]
    assert kv["reserved_bytes"].tolist() == kv["token_state_bytes"].tolist()  # grown by torch.cat
    assert trace.meta["kv_shapes"] == {
        "DynamicCache": dict(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype_bytes=F32, batch=BATCH)
    }


def test_kv_shapes_follow_a_new_batch_in_the_same_capture(tmp_path):
    """The formula's shapes are taken again when a cache of the same name comes with another
    batch (they are not re-read per token)."""
    model = tiny_llama()
    with profiler.profile(out=tmp_path, name="two", backend="cpu") as prof:
        for batch in (BATCH, BATCH + 1):
            ids = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    trace = load_trace(prof.run_dir)
    assert trace.meta["kv_shapes"]["DynamicCache"]["batch"] == BATCH + 1
    assert set(trace.kv["batch"]) == {BATCH, BATCH + 1}


def test_kv_cache_allocations_are_the_cache(dynamic):
    trace, output = dynamic
    ev = trace.events
    kv_allocs = ev[(ev["action"] == "alloc") & (ev["category"] == "kv_cache")]
    assert len(kv_allocs) == NEW * LAYERS * 2  # one K and one V tensor per layer and forward
    for s in range(NEW):  # at each step's end the allocator holds exactly that step's cache
        assert kv_alive(ev, upto_step=s) == kv_formula(PROMPT + s), s
    final = PROMPT + NEW - 1  # the last token is sampled, never fed back
    assert kv_alive(ev) == kv_formula(final)
    cache = cache_of(output)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == kv_formula(final)
    hooked = kv_allocs[kv_allocs["step"] < 3]
    assert hooked["module"].astype(str).str.fullmatch(r"model\.layers\.\d\.self_attn").all()
    assert (kv_allocs["phase"] == "forward").all()


def test_without_stacks_the_wrap_stamps_what_the_update_allocates(tmp_path):
    """With stacks, finalize reads kv_cache from the cache code's frames (finalize/sites.py) and
    the wrap stamps nothing; without them, the wrap's hint gives the same categories."""
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    with profiler.profile(out=tmp_path, name="bare", backend="cpu", stacks=False) as prof:
        kept = model.generate(  # noqa: F841 - its cache stays alive past the capture's end
            ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True
        )
    ev = load_trace(prof.run_dir).events
    assert ev["stack_id"].isna().all()
    kv_allocs = ev[(ev["action"] == "alloc") & (ev["category"] == "kv_cache")]
    assert len(kv_allocs) == NEW * LAYERS * 2
    for s in range(NEW):
        assert kv_alive(ev, upto_step=s) == kv_formula(PROMPT + s), s


def test_with_stacks_the_wrap_only_marks_its_cache_changed(tmp_path, monkeypatch):
    from profiler.capture.modules import ModuleTracer

    retags = []
    original = ModuleTracer.retag

    def counted(self):
        retags.append(self.local.hint)
        original(self)

    monkeypatch.setattr(ModuleTracer, "retag", counted)
    trace, _ = generate(tmp_path, "stacks")
    assert "kv_cache" not in retags
    kv = trace.kv.sort_values("step")
    assert kv["tokens"].tolist() == [PROMPT + s for s in range(NEW)]  # each update still marked its cache
    ev = trace.events
    assert ((ev["action"] == "alloc") & (ev["category"] == "kv_cache")).sum() == NEW * LAYERS * 2


def test_the_wrap_ends_with_the_capture(dynamic):
    from transformers.cache_utils import Cache

    assert not hasattr(Cache.update, "__wrapped__")


def test_report_shows_the_cache_against_the_formula(dynamic):
    trace, _ = dynamic
    report = build_report(trace)
    (cache,) = report["kv"]
    final = PROMPT + NEW - 1
    assert cache["cache"] == "DynamicCache" and cache["steps"] == NEW and cache["tokens"] == final
    assert cache["token_state_bytes"] == cache["reserved_bytes"] == cache["formula_bytes"] == kv_formula(final)
    assert cache["formula_matches"] is True
    assert cache["bytes_per_token"] == kv_formula(1, batch=1)
    text = render(report)
    assert "KV caches at their last step" in text
    expect = f"{LAYERS} layers x 2 x {final} tokens x {KV_HEADS} kv_heads x {HEAD_DIM} head_dim x {F32} B"
    assert f"{expect} x batch {BATCH} = {kv_formula(final):,} B, agrees" in text


def test_static_cache_reserves_everything_and_fills_by_token(tmp_path):
    trace, output = generate(tmp_path, "static", cache_implementation="static")
    cache = cache_of(output)
    assert type(cache).__name__ == "StaticCache"
    max_len = cache.layers[0].max_cache_len
    assert max_len >= PROMPT + NEW - 1
    kv = trace.kv.sort_values("step")
    assert trace.steps["step"].tolist() == kv["step"].tolist() == list(range(NEW))
    assert kv["tokens"].tolist() == [PROMPT + s for s in range(NEW)]
    assert kv["token_state_bytes"].tolist() == [kv_formula(PROMPT + s) for s in range(NEW)]
    assert set(kv["reserved_bytes"]) == {kv_formula(max_len)}
    # The zeros preallocated in the prefill's update are the cache, to the byte.
    assert kv_alive(trace.events) == kv_formula(max_len)


def test_sampled_hooks_come_back_inside_a_decode_step(tmp_path):
    trace, _ = generate(tmp_path, "sampled", hooked_steps=(2, 4))
    hooked = trace.steps["modules_hooked"].tolist()
    assert hooked == [True, True, False, False, True, False]
    ev = trace.events
    kv_allocs = ev[(ev["action"] == "alloc") & (ev["category"] == "kv_cache")]
    for step in range(len(hooked)):
        # Hooks installed at the step's start, inside the model's call, still see its layers; an
        # unhooked step takes them from a hooked step with the same allocation sites.
        modules = kv_allocs[kv_allocs["step"] == step]["module"]
        assert len(modules) and modules.astype(str).str.fullmatch(r"model\.layers\.\d\.self_attn").all(), step
    assert (trace.modules["depth"] == 0).sum() == 1  # no layer was taken for a root


def test_training_steps_are_unchanged_by_a_no_grad_forward_first(tmp_path):
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    with profiler.profile(out=tmp_path, name="ref", backend="cpu") as prof:
        for _ in range(3):
            opt.zero_grad()
            x = torch.randn(4, 8)
            with torch.no_grad():
                target = reference(x)  # a reference model's forward begins each step
            torch.nn.functional.mse_loss(policy(x), target).backward()
            opt.step()
    trace = load_trace(prof.run_dir)
    assert trace.steps["step"].tolist() == [0, 1, 2]  # the optimizer's steps, as without the rule
    for s in range(3):
        phases = trace.phases[trace.phases["step"] == s]["phase"].astype(str).tolist()
        assert phases == ["forward", "backward", "optimizer"], (s, phases)
    assert trace.kv.empty


def test_a_script_that_steps_itself_keeps_its_steps(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (BATCH, PROMPT))
    cache = transformers.DynamicCache(config=model.config)
    with profiler.profile(out=tmp_path, name="own", backend="cpu") as prof, torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            ids = logits[:, -1:].argmax(-1)
            prof.step()
    trace = load_trace(prof.run_dir)
    assert trace.steps["step"].tolist() == [0, 1, 2]
    kv = trace.kv.sort_values("step")  # measured at each of its step ends, without record_kv
    assert kv["step"].tolist() == [0, 1, 2]
    assert kv["token_state_bytes"].tolist() == [kv_formula(PROMPT + s) for s in range(3)]


SCRIPT = textwrap.dedent(f"""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size={VOCAB}, hidden_size={HIDDEN}, intermediate_size={2 * HIDDEN}, num_hidden_layers={LAYERS},
        num_attention_heads={HEADS}, num_key_value_heads={KV_HEADS}, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, {VOCAB}, ({BATCH}, {PROMPT}))
    out = model.generate(ids, max_new_tokens={NEW}, min_new_tokens={NEW}, do_sample=False, pad_token_id=0)
    print("generated", tuple(out.shape))
""")


def test_vramscope_run_needs_no_change_to_the_script(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    out = tmp_path / "traces"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "profiler.cli", "run", "--backend", "cpu", "--out", str(out), str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"generated ({BATCH}, {PROMPT + NEW})" in proc.stdout
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    trace = load_trace(run)
    assert trace.steps["step"].tolist() == list(range(NEW))
    kv = trace.kv.sort_values("step")
    assert kv["step"].tolist() == list(range(NEW))
    assert kv["token_state_bytes"].tolist() == [kv_formula(PROMPT + s) for s in range(NEW)]
    ev = trace.events
    assert ((ev["action"] == "alloc") & (ev["category"] == "kv_cache")).sum() == NEW * LAYERS * 2


def test_an_unknown_cache_api_warns_once_and_the_capture_goes_on(tmp_path, monkeypatch):
    import types

    from profiler.capture import hf_cache

    fake = types.ModuleType("transformers.cache_utils")
    fake.Cache = type("Cache", (), {})  # no update: not the API the wrap knows
    monkeypatch.setitem(sys.modules, "transformers.cache_utils", fake)
    monkeypatch.setattr(hf_cache, "_warned", False)
    with pytest.warns(RuntimeWarning, match="KV caches are not followed") as seen:
        with profiler.profile(out=tmp_path, name="fake", backend="cpu") as prof:
            with torch.no_grad():
                for _ in range(2):
                    torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert len([w for w in seen if "KV caches" in str(w.message)]) == 1
    trace = load_trace(prof.run_dir)
    assert trace.status == "complete" and trace.kv.empty
    assert trace.steps["step"].tolist() == [0, 1]  # two inference forwards, two steps
