"""vramscope dashboard: `VRAMSCOPE_TRACES=traces streamlit run dashboard/app.py`.

Only wires the pages together; each page is a short script in pages/. The pages import
`profiler` and `dashboard` as packages: installed (pip install -e .), or found through the
PYTHONPATH that `vramscope dashboard` sets to the repository.
"""

from pathlib import Path

import streamlit as st

_PAGES = Path(__file__).resolve().parent / "pages"
PAGES = [
    ("runs.py", "Runs", ":material/table:"),
    ("overview.py", "Overview", ":material/show_chart:"),
    ("layers.py", "Layers", ":material/account_tree:"),
    ("categories.py", "Categories", ":material/stacked_line_chart:"),
    ("fragmentation.py", "Fragmentation", ":material/grid_view:"),
    ("leaks.py", "Growth", ":material/trending_up:"),
    ("kv.py", "KV cache", ":material/memory:"),
    ("compare.py", "Compare", ":material/compare_arrows:"),
    ("ranks.py", "Ranks", ":material/dns:"),
    ("stacks.py", "Stacks", ":material/layers:"),
    ("live.py", "Live", ":material/sensors:"),
    ("estimate.py", "Estimate", ":material/calculate:"),
]

st.set_page_config(page_title="vramscope", layout="wide")
st.navigation([st.Page(_PAGES / f, title=t, icon=i, default=(f == "runs.py")) for f, t, i in PAGES]).run()
