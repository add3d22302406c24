"""The verdicts the Fragmentation and Growth pages lead with, drawn from the same analysis
functions (and the same facts) as `vramscope explain` and `vramscope leaks`."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from profiler.units import exact_bytes, human_bytes


def fragmentation_verdict(trace, lt) -> None:
    """Why reserved exceeds allocated at the reserved peak: the verdict, its parts in bytes,
    what to try, and the holes by the free that left them."""
    from profiler.analysis.explain import explain
    from profiler.report_explain import PART_LABELS, explanation_facts

    f = explanation_facts(explain(trace, lt), top=20)
    with st.container(key="headline", border=True):  # the page's headline, as every page has one
        st.markdown(f["verdict"])
    parts = pd.DataFrame(
        {
            "cause": [PART_LABELS[p] for p in f["parts"]],
            "bytes": [human_bytes(v) for v in f["parts"].values()],
            "exact bytes": [f"{v:,}" for v in f["parts"].values()],
        }
    )
    st.dataframe(parts, hide_index=True)
    st.caption(
        f"They add up to reserved - allocated = {exact_bytes(f['gap_bytes'])}; inside allocated bytes,"
        f" rounding requests up to blocks adds {exact_bytes(f['rounding_bytes'])}."
    )
    for s in f["suggestions"]:
        figure = "" if s["figure_bytes"] is None else f" ({human_bytes(s['figure_bytes'])})"
        st.markdown(f"- **`{s['action']}`**{figure}: {s['why']}")
    if f["holes"]:
        with st.expander("Holes inside used segments, by the free that left them"):
            holes = pd.DataFrame(f["holes"])
            holes["size"] = [human_bytes(b) for b in holes["bytes"]]
            st.dataframe(holes[["size", "bytes", "holes", "module", "site"]], hide_index=True)


def slack_view(trace, lt):
    """The allocator's slack at every step end: which part matters and why, a line for each part the
    run did not record, one panel per part, and the numbers (analysis.slack). Returns the verdict
    and the table it was drawn from."""
    from dashboard import figures
    from dashboard.pages._shared import show_table
    from profiler.analysis.slack import SLACK_NAMES, not_recorded, slack_by_step, slack_verdict

    by_step = slack_by_step(trace, lt)
    verdict = slack_verdict(by_step)
    with st.container(key="slack_verdict", border=True):
        st.markdown(verdict.sentence)
    for name in not_recorded(by_step):
        st.caption(f"{name.capitalize()}: not recorded at the step ends of this run, so not drawn.")
    st.plotly_chart(figures.slack_panels(by_step, SLACK_NAMES), key="slack_panels")
    # Headers as the panels name them: "cached but free (GiB)", "allocator retries".
    named = {"cached_free_bytes": "cached_but_free_bytes", "num_alloc_retries": "allocator_retries"}
    show_table(by_step.drop(columns="event_index").rename(columns=named))
    return verdict, by_step


def growth_view(trace, lt) -> None:
    """What keeps growing from step to step: the verdict, the leaks and other growth, and the
    bytes per step end of the groups that grew."""
    from profiler.analysis.leaks import STEADY, leaks
    from profiler.report_leaks import growth_facts

    g = leaks(trace, lt)
    f = growth_facts(g, top=20)
    with st.container(key="headline", border=True):  # the page's headline, as every page has one
        st.markdown(f["verdict"])
    for title, key in (("Leaks", "leaks"), ("Grew, then stopped or still filling a cache", "other_growth")):
        if f[key]:
            st.subheader(title)
            st.dataframe(pd.DataFrame(f[key]), hide_index=True)
    grew = g.table["kind"] != STEADY
    if grew.any():
        per_step = g.by_step[grew.to_numpy()].T
        per_step.columns = [f"{s} ({m or 'no module'})" for s, m in zip(g.table["site"][grew], g.table["module"][grew])]
        per_step.index.name = "step"
        st.line_chart(per_step)
        st.caption("Bytes alive at each step end, per allocation site that grew.")
