"""Strings from traces, made safe to show where Streamlit renders Markdown.

st.warning, st.error, st.info, st.success and st.caption render their text as Markdown:
a run's name, a folder name or a value quoted from meta.json could otherwise put an
image, a link, a colour directive (`:red[...]`) or formula markup on the page. Every
ASCII punctuation character is backslash-escaped (CommonMark's escapes: each one shows as
itself), which also keeps `http://` and `www.` from becoming links.
"""

from __future__ import annotations

import string

from profiler.errors import one_line

_ESCAPES = str.maketrans({c: "\\" + c for c in string.punctuation})


def literal(text: object) -> str:
    """`text` on one line, shown exactly as it reads when rendered as Markdown."""
    return one_line(str(text)).translate(_ESCAPES)
