"""Finalize: from what the capture journals to the published tables.

    tables      the pipeline (finalize_tables), run by the writer at the end and by
                the reader for a run that never finished
    markers     step boundaries and role positions from markers in the event stream
    blocks      allocator block sizes, replayed from requests and segments
    templates   modules and phases for unhooked steps, from hooked steps with the same allocation sites
    classify    each allocation's category

Each step is a function over whole columns; none of them opens a file.
"""
