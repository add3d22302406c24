"""The report of one run: the facts `vramscope report` and the dashboard show, and their text.

A report is built from data already parsed (a Trace, or a job's rank partitions), as one
dict of plain JSON-ready values; `render` and `to_json` turn that dict into text and never
read anything themselves. Nothing here captures, prints or writes.

Byte counts are shown in binary units and as exact bytes, so that they can be checked
against torch's own counters. The peak is of allocated bytes, which drop when a free is
requested; "active then" adds the blocks whose free has not yet completed.

A distributed job's directory (one rank=N partition per rank) gets a table of its ranks
(status, peaks, skew) in front of the full report of its largest rank.
"""

from __future__ import annotations

import json
from pathlib import Path

from profiler import report_state
from profiler.report_explain import render_explanation
from profiler.report_format import plain, text_table
from profiler.report_leaks import render_growth
from profiler.units import exact_bytes, human_bytes


def report_of(path, top: int = 10) -> dict:
    """The report of a run directory; for a multi-rank job's directory, its ranks' table in front
    of the report of its largest rank."""
    from profiler.trace import layout
    from profiler.trace.reader import load_trace  # pandas only where a trace is read

    job = None
    if layout.is_multi_rank(path) and layout.run_root_of(path) == Path(path):
        job = build_ranks(path)
        path = job["largest_rank_path"]
    report = build_report(load_trace(path), top=top)
    return report if job is None else {"ranks": job, **report}


def build_ranks(job_dir) -> dict:
    """A job's ranks: one row each, the skew of their peaks, and which rank is the largest."""
    from profiler.analysis import ranks
    from profiler.errors import TraceError
    from profiler.trace import layout

    table = layout.rank_table(job_dir)
    skew = ranks.rank_skew(table)
    if skew["max_rank"] is None:
        raise TraceError(f"{job_dir}: no rank of this job could be read")
    keep = ["rank", "status", "peak_allocated_bytes", "peak_reserved_bytes", "median_step_time_us", "skew_pct", "error"]
    # A rank without a final status is checked against its process: running, died or running?.
    rows = [
        {k: row[k] for k in keep} | {"status": layout.shown_status(row["path"], row["status"])}
        for row in table.to_dict("records")
    ]
    largest = table.loc[table["rank"] == skew["max_rank"], "path"].iloc[0]
    return plain(
        {"path": str(job_dir), "world_size": len(table), "skew": skew, "rows": rows, "largest_rank_path": str(largest)}
    )


# -- the facts ------------------------------------------------------------------------


_RUN_KEYS = ("run_id", "name", "backend", "device", "torch_version", "status", "steps", "events", "events_dropped")


def build_report(trace, top: int = 10) -> dict:
    """Everything the report shows, as plain JSON-ready values (ints stay exact); see _with_warnings."""
    from profiler.analysis.categories import category_at_peak
    from profiler.analysis.explain import explain
    from profiler.analysis.fragmentation import fragmentation_at_peak
    from profiler.analysis.integrity import check_module_peaks, trace_warnings
    from profiler.analysis.leaks import leaks
    from profiler.analysis.live import lifetimes
    from profiler.analysis.modules import module_table
    from profiler.analysis.summary import run_summary
    from profiler.analysis.timeline import peak
    from profiler.report_explain import explanation_facts
    from profiler.report_leaks import growth_facts

    lt = lifetimes(trace)  # paired once, shared by every section
    warnings = trace_warnings(trace, lt)  # raises where the numbers cannot be trusted
    s = run_summary(trace, lt)
    p = peak(trace, lt)
    modules = module_table(trace, lt=lt)
    check_module_peaks(trace, modules, p.allocated_bytes)
    allocating = ["forward_alloc_bytes", "backward_alloc_bytes", "recompute_alloc_bytes", "peak_contribution_bytes"]
    busy = modules[allocating].sum(axis=1) > 0
    cats = category_at_peak(trace, lt)
    allocator_max = s["allocator_max_allocated_bytes"]
    report = plain(
        {
            "run": {k: s[k] for k in _RUN_KEYS} | {"path": str(trace.path), **report_state.run_state(trace, s)},
            "peak": {
                "allocated_bytes": p.allocated_bytes,
                "active_bytes": s["active_at_peak_bytes"],
                "reserved_bytes": s["peak_reserved_bytes"],
                "step": p.step,
                "phase": p.phase,
                "event_index": p.event_index,
                "ts_us": p.ts_us,
            },
            "allocator": {
                "max_allocated_bytes": allocator_max,
                "max_reserved_bytes": s["allocator_max_reserved_bytes"],
                "replay_matches": allocator_max == p.allocated_bytes,
                "replay_minus_allocator_bytes": None if allocator_max is None else p.allocated_bytes - allocator_max,
            },
            "modules": modules[busy].head(top).to_dict("records"),
            "categories": cats[cats["total_bytes"] != 0].to_dict("records"),
            "fragmentation": fragmentation_at_peak(trace, lt),
            "explanation": explanation_facts(explain(trace, lt)),
            "growth": growth_facts(leaks(trace, lt)),
            "median_step_time_us": s["median_step_time_us"],
            "tokens_per_s": s["tokens_per_s"],
        }
    )
    if not trace.kv.empty:  # only runs with KV caches have the section
        report["kv"] = kv_caches(trace)
    return _with_warnings(report, trace, lt, warnings)


def kv_caches(trace) -> list[dict]:
    """Each KV cache at its last step: tokens, token-state, reserved bytes, bytes per token, and
    the formula layers x 2 x tokens x kv_heads x head_dim x dtype x batch where the capture
    recorded the shapes (meta.json's kv_shapes)."""
    from profiler.analysis.kv import kv_summary, kv_table

    return plain(kv_summary(kv_table(trace), trace.meta.get("kv_shapes")).to_dict("records"))


def _with_warnings(report: dict, trace, lt, integrity: list[str]) -> dict:
    """The report with "warnings" added when something warrants one: the trace's own
    inconsistencies (profiler.analysis.integrity), then bytes at the peak that no
    label explains (attribution_warnings)."""
    from profiler.analysis.attribution import unattributed_at_peak

    warnings = [dict(reason="integrity", message=m) for m in integrity]
    warnings += attribution_warnings(unattributed_at_peak(trace, lt), report["peak"]["step"])
    return report | {"warnings": plain(warnings)} if warnings else report


WARN_SHARE = 0.01  # a reason warns once it explains this share of the bytes at the peak
_WHY = {
    "unpaired": "{steps} ran unhooked, and these allocations pair with no hooked one for certain "
    "(a one-off buffer, or an allocation site that repeats or has no stack); "
    "rerun with --hooked-steps all (hooked_steps=None)",
    "unhooked": "{steps} ran unhooked and no hooked step matched these allocations; "
    "rerun with --hooked-steps all (hooked_steps=None)",
    "modules_off": "this capture ran without module hooks (modules=False)",
    "outside_module": "made outside any module in {steps} (an input batch, or a loss computed outside the model)",
    "before_capture": "allocated before the capture began",
}


def attribution_warnings(unattributed: dict, peak_step: int | None) -> list[dict]:
    """One warning per reason (profiler.analysis.attribution) that leaves at least WARN_SHARE
    of the bytes at the peak with no module, no role and no optimizer or user phase."""
    total = unattributed["allocated_bytes"]
    out = []
    for r in unattributed["reasons"]:
        share = r["bytes"] / total if total else 0.0
        if share < WARN_SHARE:
            continue
        at = "" if peak_step is None else f" (step {peak_step})"
        why = _WHY[r["reason"]].format(steps=step_ranges(r["steps"]))
        message = f"{100 * share:.0f}% of bytes at the peak{at} have no module: {why}"
        out.append(dict(reason=r["reason"], bytes=r["bytes"], share=share, steps=r["steps"], message=message))
    return out


def step_ranges(steps: list[int]) -> str:
    """ "step 7", "steps 3-5, 9": runs of consecutive steps as ranges."""
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return ("step " if len(steps) == 1 else "steps ") + text if steps else "steps before the first"


# -- the text -------------------------------------------------------------------------


def _header(r: dict) -> list[str]:
    run = r["run"]
    step_us = r["median_step_time_us"]
    step_time = "" if step_us is None else f"   median step {step_us / 1000:,.1f} ms"
    if r.get("tokens_per_s") is not None:
        step_time += f"   {r['tokens_per_s']:,.0f} tokens/s"
    return [
        f"vramscope report: {run['name']}  ({run['run_id']})",
        f"  backend {run['backend']}   device {run['device']}   torch {run['torch_version']}",
        f"  status {run['status']}   steps {report_state.steps_text(run)}   events {run['events']:,}"
        f"   dropped {run['events_dropped']:,}{step_time}",
    ] + report_state.state_lines(run)


def _peak(r: dict) -> list[str]:
    p, a = r["peak"], r["allocator"]
    where = (
        "at the start of capture"
        if p["event_index"] < 0
        else f"step {p['step']}, phase {p['phase'] or '(none)'}, event {p['event_index']:,}"
    )
    reserved = (
        exact_bytes(p["reserved_bytes"])
        if p["reserved_bytes"] is not None
        else "n/a (the CPU backend has no allocator cache)"
    )
    if a["max_allocated_bytes"] is None:
        verdict = "not recorded"
    elif a["replay_matches"]:
        verdict = "replay agrees"
    else:
        verdict = f"replay DIFFERS by {a['replay_minus_allocator_bytes']:+,} B"
    pending = p["active_bytes"] - p["allocated_bytes"] if p.get("active_bytes") is not None else 0
    pending_note = f"  ({human_bytes(pending)} freed, not yet released)" if pending else ""
    return [
        f"Peak allocated   {exact_bytes(p['allocated_bytes'])}  {where}",
        f"Active then      {exact_bytes(p.get('active_bytes'))}{pending_note}",
        f"Peak reserved    {reserved}",
        f"Allocator max    {exact_bytes(a['max_allocated_bytes'])}  {verdict}",
    ]


def _modules(r: dict) -> list[str]:
    if not r["modules"]:
        return ["Top modules: none with allocations to list"]
    rows = [
        [
            m["module"] or "(root)",
            m["class_name"] or "",
            human_bytes(m["peak_contribution_bytes"]),
            human_bytes(m["retained_bytes"]),
            human_bytes(m["forward_alloc_bytes"]),
            human_bytes(m["backward_alloc_bytes"]),
            human_bytes(m["param_bytes"]),
        ]
        for m in r["modules"]
    ]
    head = ["module", "class", "at peak", "retained", "forward", "backward", "params"]
    return [f"Top {len(rows)} modules by bytes alive at the peak"] + text_table(head, rows, {2, 3, 4, 5, 6})


def _categories(r: dict) -> list[str]:
    rows = [
        [
            c["category"],
            human_bytes(c["total_bytes"]),
            f"{c['total_bytes']:,}",
            f"{c['count']:,}",
            f"{100 * c['share']:.1f}%",
        ]
        for c in r["categories"]
    ]
    head = ["category", "bytes", "exact", "blocks", "share"]
    return ["Categories at the peak"] + text_table(head, rows, {1, 2, 3, 4})


def _fragmentation(r: dict) -> list[str]:
    f = r["fragmentation"]
    if f["reserved_bytes"] is None:
        return ["Fragmentation at the peak: n/a (the CPU backend has no allocator segments)"]
    ratio = f["fragmentation_ratio"]
    rows = [
        ["reserved - allocated", exact_bytes(f["reserved_minus_allocated_bytes"])],
        ["inactive split", exact_bytes(f["inactive_split_bytes"])],
        ["largest free block", exact_bytes(f["largest_free_block_bytes"])],
        ["fragmentation ratio", "n/a" if ratio is None else f"{100 * ratio:.1f}%"],
    ]
    return ["Fragmentation at the peak"] + text_table(["", ""], rows, set())[1:]


def _ranks(r: dict) -> list[str]:
    job, skew = r["ranks"], r["ranks"]["skew"]
    rows = [
        [
            str(x["rank"]),
            x["status"] or "",
            exact_bytes(x["peak_allocated_bytes"]),
            exact_bytes(x["peak_reserved_bytes"]),
            "" if x["median_step_time_us"] is None else f"{x['median_step_time_us'] / 1000:,.1f}",
            "" if x["skew_pct"] is None else f"{x['skew_pct']:+.2f}%",
            x["error"] or "",
        ]
        for x in job["rows"]
    ]
    head = ["rank", "status", "peak allocated", "peak reserved", "step ms", "vs median", "error"]
    ratio = "n/a" if skew["max_min_ratio"] is None else f"{skew['max_min_ratio']:.4f}"
    return (
        [
            f"vramscope job: {job['path']}   {job['world_size']} ranks   largest rank {skew['max_rank']}"
            f"   max/min peak {ratio}"
        ]
        + text_table(head, rows, {0, 2, 3, 4, 5})
        + ["", f"The largest rank (rank {skew['max_rank']}) in full:"]
    )


def _kv(r: dict) -> list[str]:
    rows = [
        [
            c["cache"],
            str(c["step"]),
            "" if c["batch"] is None else str(c["batch"]),
            f"{c['tokens']:,}",
            exact_bytes(c["token_state_bytes"]),
            exact_bytes(c["reserved_bytes"]),
            human_bytes(c["extra_bytes"]),
            "n/a" if c["bytes_per_token"] is None else f"{c['bytes_per_token']:,.0f} B",
        ]
        for c in r["kv"]
    ]
    head = ["cache", "step", "batch", "tokens", "token states", "reserved", "extra", "per token"]
    lines = ["KV caches at their last step"] + text_table(head, rows, {1, 2, 3, 4, 5, 6, 7})
    for c in r["kv"]:
        f = c["shape"]
        if f is not None:
            verdict = "agrees" if c["formula_matches"] else "DIFFERS from the measured token states"
            lines.append(
                f"  {c['cache']}: {f['layers']} layers x 2 x {c['tokens']:,} tokens x {f['kv_heads']} kv_heads"
                f" x {f['head_dim']} head_dim x {f['dtype_bytes']} B x batch {f['batch']}"
                f" = {c['formula_bytes']:,} B, {verdict}"
            )
    return lines


def render(report: dict) -> str:
    """The report as aligned plain text."""
    header = _header(report) + [f"  warning: {w['message']}" for w in report.get("warnings", [])]
    sections = [header, _peak(report), _modules(report), _categories(report), _fragmentation(report)]
    if report.get("explanation", {}).get("has_segments"):
        sections.append(render_explanation(report["explanation"]))
    if "growth" in report:
        sections.append(render_growth(report["growth"]))
    if report.get("kv"):
        sections.append(_kv(report))
    if "ranks" in report:
        sections.insert(0, _ranks(report))
    return "\n\n".join("\n".join(s) for s in sections)


def to_json(report: dict) -> str:
    """The report as one JSON object (what `vramscope report --json` prints)."""
    return json.dumps(report, indent=1)
