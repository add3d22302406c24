"""vramscope's dashboard: a Streamlit app over a folder of runs (streamlit run dashboard/app.py).

data.py loads and caches runs and holds the pure transforms; figures.py builds plotly
figures from DataFrames; pages/ are short scripts that wire widgets to both. Every
number comes from profiler.analysis, the same functions `vramscope report` calls.
"""
