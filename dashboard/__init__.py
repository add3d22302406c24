"""vramscope's dashboard: a Streamlit app over a folder of runs (streamlit run dashboard/app.py).

data.py loads and caches runs; figures.py builds plotly figures from DataFrames; pages/
are short scripts that wire widgets to both. Every number comes from profiler.analysis,
the functions profiler.report (`vramscope report`) calls, and bytes read as
profiler.units writes them; no page imports the CLI.
"""
