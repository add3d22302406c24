"""Trace strings shown where Streamlit renders Markdown read as themselves: no image, link or markup."""

from __future__ import annotations

import re

import pytest

markdown_it = pytest.importorskip("markdown_it")

from dashboard.text import literal  # noqa: E402

HOSTILE = [
    "![pixel](http://evil.example/p.png)",
    "[click me](javascript:alert(1)) and <http://evil.example>",
    "**bold** _em_ `code` ~~gone~~ # heading",
    ":red[alarm] :material/warning: $x^2$ <img src=x onerror=alert(1)>",
    "run\\with\\backslashes | a | table |",
    "www.evil.example and https://evil.example/x",
    "1. a list?\n- or this\n> quoted",
]


def _text_of(html: str) -> str:
    from html import unescape

    return unescape(re.sub(r"<[^>]+>", "", html)).strip()


@pytest.mark.parametrize("text", HOSTILE)
def test_a_trace_string_renders_as_its_own_text(text):
    shown = literal(text)
    html = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(shown)
    assert re.findall(r"<(\w+)", html) == ["p"]  # one paragraph, nothing inside it
    assert _text_of(html) == " ".join(text.split())  # every character shows as itself, on one line
    # GFM's literal autolinks (which Streamlit's renderer has) need "://" or "www." as written:
    assert "://" not in shown and "www." not in shown
