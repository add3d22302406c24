"""Compare: the ablation table against a baseline, timelines aligned by step, and two runs' diffs.

A multi-rank run takes part per GPU: its summary is the job's (layout.run_group_summary) and its
timeline and layers are those of its rank with the largest peak."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from dashboard.text import literal
from profiler import analysis
from profiler.analysis.compare import ablation_view, differing_columns
from profiler.analysis.ranks import step_aligned

MAX_OVERLAID = 8

st.title("Compare")
table = ui.readable(ui.runs())
names = dict(zip(table["run"], table["name"]))
kept = [r for r in st.session_state.get(ui.SELECTED, []) if r in names]
chosen = st.multiselect(
    "Runs (pick them on the Runs page or here)",
    list(names),
    default=kept or list(names)[:2],
    format_func=lambda p: names[p],
)
st.session_state[ui.SELECTED] = chosen
if len(chosen) < 2:
    st.info("Pick at least two runs to compare.")
    st.stop()

baseline = st.selectbox("Baseline", range(len(chosen)), format_func=lambda i: names[chosen[i]])
summaries = [ui.data.stored_summary(r) for r in chosen]
root = str(ui.data.traces_dir())
losses = ui.data.cached_ablation_losses(root, ui.data.root_stamp(root))
view = ablation_view(summaries, baseline, losses, chosen)
if (view["world_size"] > 1).any():
    st.caption("Peaks of multi-rank runs are per GPU: the largest rank's.")
if st.toggle("Differences only", value=True):
    view = view[differing_columns(view, keep=("run", "name", "world_size", "is_baseline"))]
st.dataframe(view, hide_index=True)
tolerance = st.number_input("Loss check: largest |loss - baseline loss|", min_value=0.0, value=0.01, format="%.4f")
off = view[view["loss_delta"].abs() > tolerance] if "loss_delta" in view else view.iloc[0:0]
if "loss_delta" not in view or view["loss_delta"].isna().all():
    st.caption("Loss check: no losses recorded for these runs (no ablation table beside them).")
elif off.empty:
    st.success(f"Loss check: every run is within {tolerance:g} of the baseline's loss.")
else:
    differing = literal(", ".join(map(str, off["name"])))
    st.error(f"Loss check: {differing} differ from the baseline's loss by more than {tolerance:g}.")

column = st.radio("Overlay", ["allocated_bytes", "active_bytes", "reserved_bytes"], horizontal=True)
lines = {}
for r, s in zip(chosen[:MAX_OVERLAID], summaries):
    loaded = ui.load(r)
    if loaded is not None:
        trace, lt = loaded
        tl = analysis.memory_timeline(trace, lt, max_points=ui.data.MAX_POINTS)
        label = (
            names[r]
            if s.get("peak_rank") is None
            else f"{names[r]} (world size {s['world_size']}, rank {s['peak_rank']})"
        )
        lines[label] = tl.assign(x=step_aligned(tl, analysis.step_spans(trace, lt)))
st.plotly_chart(figures.overlay_timelines(lines, column))

st.subheader("Two runs, layer by layer and category by category")
a = st.selectbox("a", chosen, index=baseline, format_func=lambda p: names[p])
b = st.selectbox("b", chosen, index=1 if baseline == 0 else 0, format_func=lambda p: names[p])
loaded_a, loaded_b = ui.load(a), ui.load(b)
if loaded_a is None or loaded_b is None:
    st.stop()
modules = analysis.compare_modules(loaded_a[0], loaded_b[0])
categories = analysis.compare_categories(ui.data.stored_summary(a), ui.data.stored_summary(b))
st.plotly_chart(figures.diff_bar(modules, "module"))
st.plotly_chart(figures.diff_bar(categories, "category"))
st.dataframe(categories, hide_index=True)
