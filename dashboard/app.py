"""vramscope dashboard: `VRAMSCOPE_TRACES=traces streamlit run dashboard/app.py`.

Only wires the pages together; each page is a short script in pages/.
"""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # streamlit puts dashboard/ on the path, not the repo
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

_PAGES = Path(__file__).resolve().parent / "pages"
PAGES = [("runs.py", "Runs", ":material/table:"), ("overview.py", "Overview", ":material/show_chart:"),
         ("layers.py", "Layers", ":material/account_tree:"), ("categories.py", "Categories", ":material/stacked_line_chart:"),
         ("fragmentation.py", "Fragmentation", ":material/grid_view:"), ("kv.py", "KV cache", ":material/memory:"),
         ("compare.py", "Compare", ":material/compare_arrows:"), ("ranks.py", "Ranks", ":material/dns:"),
         ("stacks.py", "Stacks", ":material/layers:"),
         ("live.py", "Live", ":material/sensors:"), ("estimate.py", "Estimate", ":material/calculate:")]

st.set_page_config(page_title="vramscope", layout="wide")
st.navigation([st.Page(_PAGES / f, title=t, icon=i, default=(f == "runs.py")) for f, t, i in PAGES]).run()
