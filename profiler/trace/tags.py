"""The allocation tag: what the capture stamps on each allocation, "phase|module|category".

The capture sets it through `_set_memory_metadata` (CUDA) or on its own events
(CPU); finalize decodes it once per distinct string. Any part may be empty.
"""

from __future__ import annotations

from profiler.trace.finalize.markers import PREFIX as MARKER_PREFIX

TAG_SEP = "|"
MARKER_PHASE = "marker"  # internal phase of the capture's position markers, never published


def make_tag(phase: str | None, module: str | None, category: str | None = None) -> str:
    return f"{phase or ''}{TAG_SEP}{module or ''}{TAG_SEP}{category or ''}"


def parse_tag(tag: str | None) -> tuple[str | None, str | None, str | None]:
    if not tag:
        return None, None, None
    if tag.startswith(MARKER_PREFIX):
        return MARKER_PHASE, None, "other"
    parts = tag.split(TAG_SEP)
    parts += [""] * (3 - len(parts))
    return parts[0] or None, parts[1] or None, parts[2] or None
