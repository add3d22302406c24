"""Memory that keeps growing from step to step, as facts and as text: `vramscope leaks`, the
report's section and the dashboard's view all come from analysis.leaks.leaks()."""

from __future__ import annotations

from profiler.units import human_bytes


def growth_facts(g, top: int = 10) -> dict:
    """A Growth as plain values: the verdict, the step ends, the leaks, and the other groups
    that grew (filled once, still filling), `top` of each at most."""
    from profiler.analysis.leaks import FILLED, FILLING, LEAK
    from profiler.report_format import plain

    t = g.table
    grew = t[t["kind"].isin([FILLED, FILLING])]
    return plain(
        {
            "verdict": g.verdict,
            "steps": len(g.steps),
            "first_step": g.steps[0] if g.steps else None,
            "last_step": g.steps[-1] if g.steps else None,
            "allocated_at_step_end_bytes": g.allocated_at_step_end,
            "leaks": t[t["kind"] == LEAK].head(top).to_dict("records"),
            "other_growth": grew.head(top).to_dict("records"),
        }
    )


def render_growth(f: dict) -> list[str]:
    """The growth facts as lines of text."""
    from profiler.report_format import text_table

    lines = ["Growth across steps (memory alive at each step end)", "  " + f["verdict"]]
    ends = f["allocated_at_step_end_bytes"]
    if len(ends) >= 2:
        first, last = f"{ends[0]:,} B (step {f['first_step']})", f"{ends[-1]:,} B (step {f['last_step']})"
        lines.append(f"  allocated at step ends: {first} -> {last}")
    for title, rows in (("Leaks", f["leaks"]), ("Grew, then stopped or still filling a cache", f["other_growth"])):
        if not rows:
            continue
        body = [
            [
                r["site"],
                r["module"] or "",
                r["category"] or "",
                r["kind"],
                str(r["first_step"]),
                f"{r['bytes_per_step']:,} B" + ("" if r["exact_per_step"] else " (median)"),
                human_bytes(r["last_bytes"]),
            ]
            for r in rows
        ]
        head = ["site", "module", "category", "kind", "since step", "per step", "at the end"]
        lines += ["", title] + text_table(head, body, {4, 5, 6})
    return lines
