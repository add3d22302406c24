"""Compare: which option saves the most memory and at what speed, what no option changed, the
ablation table against a baseline, timelines aligned by step, and two runs' diffs.

A multi-rank run takes part per GPU: its summary is the job's (layout.run_group_summary) and its
timeline and layers are those of its rank with the largest peak."""

import streamlit as st

from dashboard import figures
from dashboard.pages import _shared as ui
from dashboard.text import literal
from profiler import analysis, headlines
from profiler.analysis.compare import ablation_view, differing_columns
from profiler.analysis.ranks import step_aligned

MAX_OVERLAID = 8

st.title("Compare")
runs = ui.runs()
table = ui.readable(runs)
ui.unreadable_note(runs)
names = ui.labels(table)
chosen = ui.keyed_multiselect(
    "Runs (pick them on the Runs page or here)", list(names), ui.SELECTED, ui.data.first_pair(table), names.__getitem__
)
if len(chosen) < 2:
    st.info("Pick at least two runs to compare.")
    st.stop()

baseline = st.selectbox("Baseline", range(len(chosen)), format_func=lambda i: names[chosen[i]], key="compare_baseline")
tolerance = st.number_input("Loss check: largest |loss - baseline loss|", min_value=0.0, value=0.01, format="%.4f")
summaries = [ui.data.stored_summary(r) for r in chosen]
root = str(ui.data.traces_dir())
losses = ui.data.cached_ablation_losses(root, ui.data.root_stamp(root))
view = ablation_view(summaries, baseline, losses, chosen)
short = list(view["name"])
warning = headlines.kind_warning(short, summaries)
# Runs of different kinds are not options of one job: naming a best one would mislead.
ui.headline(warning or headlines.compare(view, summaries, baseline, tolerance))
sites = [ui.data.peak_story_of(r)["sites"] for r in chosen[:MAX_OVERLAID]]
same = headlines.unchanged(short[:MAX_OVERLAID], sites)
if same:
    st.info(literal(same))
st.caption(headlines.SPEED_SIGN + " Memory saved is against the baseline's peak: positive is less memory.")

if (view["world_size"] > 1).any():
    st.caption("Peaks of multi-rank runs are per GPU: the largest rank's.")
if st.toggle("Differences only", value=True):
    view = view[differing_columns(view, keep=("name", "world_size", "is_baseline"))]
ui.show_table(view)
off = view[view["loss_delta"].abs() > tolerance] if "loss_delta" in view else view.iloc[0:0]
if "loss_delta" not in view or view["loss_delta"].isna().all():
    st.caption("Loss check: no losses recorded for these runs (no ablation table beside them).")
elif off.empty:
    st.success(f"Loss check: every run is within {tolerance:g} of the baseline's loss.")
else:
    differing = literal(", ".join(map(str, off["name"])))
    st.error(f"Loss check: {differing} differ from the baseline's loss by more than {tolerance:g}.")

column = st.radio(
    "Overlay", ["allocated_bytes", "active_bytes", "reserved_bytes"], horizontal=True, format_func=ui.words
)
lines = {}
for r, s in zip(chosen[:MAX_OVERLAID], summaries):
    loaded = ui.load(r)
    if loaded is not None:
        trace, lt = loaded
        tl = ui.data.timeline_of(r)
        label = names[r] if s.get("peak_rank") is None else f"{names[r]} (rank {s['peak_rank']} of {s['world_size']})"
        lines[label] = tl.assign(x=step_aligned(tl, ui.data.peak_story_of(r)["spans"]))
st.plotly_chart(figures.overlay_timelines(lines, column))

st.subheader("Two runs, layer by layer and category by category")
a = st.selectbox("a", chosen, index=baseline, format_func=names.__getitem__, key="compare_a")
b = st.selectbox("b", chosen, index=1 if baseline == 0 else 0, format_func=names.__getitem__, key="compare_b")
loaded_a, loaded_b = ui.load(a), ui.load(b)
if loaded_a is None or loaded_b is None:
    st.stop()
modules = analysis.compare_modules(loaded_a[0], loaded_b[0])
categories = analysis.compare_categories(ui.data.stored_summary(a), ui.data.stored_summary(b))
st.plotly_chart(figures.diff_bar(modules, "module"))
st.plotly_chart(figures.diff_bar(categories, "category"))
ui.show_table(categories)
