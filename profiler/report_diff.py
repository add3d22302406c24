"""Two runs compared, as facts and as text: what `vramscope diff A B` prints, from
analysis.compare.diff_runs (the functions the dashboard's Compare page calls).

diff_facts turns a RunDiff into plain JSON-ready values (byte counts stay exact ints);
render_diff turns those into text and reads nothing itself.
"""

from __future__ import annotations

from profiler.units import human_bytes

_LABEL_KEYS = ("run_id", "name", "backend", "device", "steps", "peak_step", "peak_phase", "peak_event_index")


def diff_facts(d, paths: tuple[str, str], top: int = 10) -> dict:
    """A RunDiff as plain values: labels of both runs, every metric, the categories that differ,
    the `top` modules by change, and every aligned (step, phase) span."""
    from profiler.report_format import plain

    cats = d.categories[(d.categories["a_bytes"] != 0) | (d.categories["b_bytes"] != 0)]
    return plain(
        {
            "a": {"path": paths[0], **{k: d.a.get(k) for k in _LABEL_KEYS}},
            "b": {"path": paths[1], **{k: d.b.get(k) for k in _LABEL_KEYS}},
            "metrics": d.metrics.to_dict("records"),
            "categories_at_peak": cats.to_dict("records"),
            "modules_at_peak": d.modules.head(top).to_dict("records"),
            "phases": d.phases.to_dict("records"),
        }
    )


def _signed(n) -> str:
    return "" if n is None else ("+" if n > 0 else "-" if n < 0 else "") + human_bytes(abs(n))


def _pct(p) -> str:
    return "" if p is None else f"{p:+.1f}%"


def _value(metric: str, v) -> str:
    if v is None:
        return "n/a"
    if metric.endswith("_bytes"):
        return f"{human_bytes(v)} ({v:,} B)"
    if metric.endswith("_us"):
        return f"{v / 1000:,.1f} ms"
    return f"{v:,.4g}" if isinstance(v, float) else f"{v:,}"


def _metrics(f: dict) -> list[str]:
    from profiler.report_format import text_table

    rows = []
    for m in f["metrics"]:
        if m["a"] is None and m["b"] is None and m["delta_pct"] is None:
            continue
        if m["a"] is None and m["b"] is None:  # the headline rows: a percentage alone
            rows.append([m["metric"], "", "", "", _pct(m["delta_pct"])])
            continue
        delta = _signed(m["delta"]) if m["metric"].endswith("_bytes") else _value(m["metric"], m["delta"])
        if m["delta"] is not None and m["delta"] > 0 and not delta.startswith("+"):
            delta = "+" + delta
        rows.append(
            [m["metric"], _value(m["metric"], m["a"]), _value(m["metric"], m["b"]), delta, _pct(m["delta_pct"])]
        )
    return text_table(["metric", "a", "b", "delta", "delta %"], rows, {1, 2, 3, 4})


def _peak_steps(f: dict, all_steps: bool) -> list[dict]:
    """The first step and the steps holding either run's peak; every step with all_steps."""
    rows = f["phases"]
    if all_steps or not rows:
        return rows
    keep = {rows[0]["step"]} | {r["step"] for r in rows if r["a_has_peak"] or r["b_has_peak"]}
    return [r for r in rows if r["step"] in keep]


def render_diff(f: dict, all_steps: bool = False) -> list[str]:
    """The comparison as lines of text: b against a, deltas as b - a."""
    from profiler.report_format import text_table

    a, b = f["a"], f["b"]
    lines = [f"vramscope diff: a = {a['name']} ({a['path']})", f"                b = {b['name']} ({b['path']})"]
    lines += ["", "Headline numbers (delta = b - a)"] + _metrics(f)
    where = "step {peak_step}, {peak_phase}"
    lines += ["", f"Peak: a at {where.format(**a)}; b at {where.format(**b)}"]
    lines += ["What changed at the peak, aligned by step and phase (peak allocated in each span; * the run's peak)"]
    rows = [
        [
            str(r["step"]),
            r["phase"],
            ("* " if r["a_has_peak"] else "") + human_bytes(r["a_peak_bytes"]),
            ("* " if r["b_has_peak"] else "") + human_bytes(r["b_peak_bytes"]),
            _signed(r["delta_bytes"]),
        ]
        for r in _peak_steps(f, all_steps)
    ]
    lines += text_table(["step", "phase", "a", "b", "delta"], rows, {0, 2, 3, 4})
    if not all_steps and len(rows) < len(f["phases"]):
        lines.append(f"  ({len(f['phases']) - len(rows)} more spans: --all-steps)")
    for title, key, name in (
        ("Categories at the peak", "categories_at_peak", "category"),
        (f"Top {len(f['modules_at_peak'])} modules by change at the peak", "modules_at_peak", "module"),
    ):
        body = [
            [
                str(r[name]),
                human_bytes(r["a_bytes"]),
                human_bytes(r["b_bytes"]),
                _signed(r["delta_bytes"]),
                _pct(r["delta_pct"]),
            ]
            for r in f[key]
        ]
        lines += ["", title] + text_table([name, "a", "b", "delta", "delta %"], body, {1, 2, 3, 4})
    return lines
