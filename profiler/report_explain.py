"""Why reserved exceeds allocated, as facts and as text: `vramscope explain`, the report's
section and the dashboard's Fragmentation verdict all come from analysis.explain.explain().

explanation_facts turns an Explanation into plain JSON-ready values (ints stay exact);
render_explanation turns those into lines of text and reads nothing itself.
"""

from __future__ import annotations

from profiler.units import exact_bytes, human_bytes

PART_LABELS = {
    "pending_free": "pending free (another stream)",
    "inactive_split": "inactive split (holes in used segments)",
    "free_segments": "segments kept, wholly free",
    "private_pools": "free in private pools",
    "unplaced": "allocated, in no replayed segment",
}


def explanation_facts(e, top: int = 8) -> dict:
    """An Explanation as plain values: the moment, the parts, the top `top` hole sources, suggestions."""
    from dataclasses import asdict

    from profiler.report_format import plain

    if not e.has_segments:
        return {"has_segments": False}
    keep = (
        "event_index",
        "at_reserved_peak",
        "step",
        "phase",
        "reserved_bytes",
        "allocated_bytes",
        "requested_bytes",
        "gap_bytes",
        "parts",
        "private_pools_known",
        "rounding_bytes",
        "split_share",
        "expandable_segments",
        "verdict",
    )
    return plain(
        {
            "has_segments": True,
            **{k: getattr(e, k) for k in keep},
            "holes": e.holes.head(top).to_dict("records"),
            "hole_sources": len(e.holes),
            "pending": e.pending.to_dict("records"),
            "suggestions": [asdict(s) for s in e.suggestions],
        }
    )


def render_explanation(f: dict) -> list[str]:
    """The explanation as lines of text (the report's section, `vramscope explain`'s output)."""
    from profiler.report_format import text_table

    if not f["has_segments"]:
        return ["Why reserved exceeds allocated: n/a (the CPU backend has no allocator segments)"]
    where = f"step {f['step']}, phase {f['phase'] or '(none)'}, event {f['event_index']:,}"
    moment = "the reserved peak" if f["at_reserved_peak"] else "the moment asked for"
    lines = [f"Why reserved exceeds allocated, at {moment} ({where})", "  " + f["verdict"], ""]
    rows = [["reserved", exact_bytes(f["reserved_bytes"])], ["allocated", exact_bytes(f["allocated_bytes"])]]
    rows.append(["reserved - allocated", exact_bytes(f["gap_bytes"])])
    for part, label in PART_LABELS.items():
        value = f["parts"][part]
        if part == "private_pools" and not f["private_pools_known"]:
            label += " (pools not recorded: counted with the rest)"
        rows.append([f"  {label}", exact_bytes(value)])
    rows.append(["rounding inside allocated", exact_bytes(f["rounding_bytes"])])
    lines += text_table(["", ""], rows, set())[1:]
    lines.append(f"  (reserved - requested = rounding + the gap = {f['rounding_bytes'] + f['gap_bytes']:,} B)")
    if f["holes"]:
        lines += ["", f"Holes by the free that left them (top {len(f['holes'])} of {f['hole_sources']})"]
        head = ["bytes", "holes", "module", "site"]
        body = [[human_bytes(h["bytes"]), str(h["holes"]), h["module"] or "", h["site"]] for h in f["holes"]]
        lines += text_table(head, body, {0, 1})
    if f["pending"]:
        lines += ["", "Pending free"]
        lines += text_table(
            ["stream", "module", "bytes"],
            [[str(p["stream"]), p["module"] or "", exact_bytes(p["bytes"])] for p in f["pending"]],
            {0, 2},
        )
    lines += ["", "What to try"] if f["suggestions"] else ["", "What to try: nothing stands out"]
    for s in f["suggestions"]:
        figure = "" if s["figure_bytes"] is None else f" [{human_bytes(s['figure_bytes'])}]"
        lines += [f"  - {s['action']}{figure}", f"    {s['why']}"]
    return lines
