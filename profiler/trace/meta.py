"""meta.json, read here and only here: read_meta() checks it as the reader needs it,
read_meta_lenient() takes whatever JSON object is there (labels for a run that cannot be read).
"""

from __future__ import annotations

import json
from pathlib import Path

from profiler.errors import TraceVersionError
from profiler.trace import schema
from profiler.trace.problems import is_int, reading, show, trace_error

_STATUSES = tuple(s.value for s in schema.Status)


def read_meta(run_dir) -> dict:
    """meta.json of a run, checked (schema.META_KEYS); a TraceError says what is wrong."""
    run = Path(run_dir)
    meta_path = run / schema.META_FILE
    if not meta_path.is_file():
        raise trace_error(run, f"not a vramscope trace (no {schema.META_FILE})")
    with reading(run, schema.META_FILE):
        raw = meta_path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise trace_error(run, f"{schema.META_FILE} is not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise trace_error(
            run, f"{schema.META_FILE} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})"
        ) from None
    except (RecursionError, ValueError) as exc:
        raise trace_error(run, f"{schema.META_FILE} cannot be parsed: {type(exc).__name__}") from None
    _check_meta(run, meta)
    return meta


def read_meta_lenient(run_dir) -> dict | None:
    """meta.json as a dict, unchecked, or None when there is no JSON object to read."""
    try:
        meta = json.loads((Path(run_dir) / schema.META_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        return None
    return meta if isinstance(meta, dict) else None


def _check_meta(run: Path, meta) -> None:
    name = schema.META_FILE
    if not isinstance(meta, dict):
        raise trace_error(run, f"{name} is not a JSON object")
    if meta.get("format") != schema.FORMAT_NAME:
        raise trace_error(
            run, f"not a vramscope trace ({name} format is {show(meta.get('format'))}, expected {schema.FORMAT_NAME!r})"
        )
    version = meta.get("schema_version")
    if not is_int(version) or version != schema.SCHEMA_VERSION:
        raise trace_error(
            run,
            f"trace schema version {show(version)} is not supported; this "
            f"vramscope reads version {schema.SCHEMA_VERSION}",
            TraceVersionError,
        )
    missing = [k for k in schema.META_REQUIRED if k not in meta]
    if missing:
        raise trace_error(run, f"{name} lacks required key(s): {', '.join(missing)}")
    for key in schema.META_STRINGS:
        if not isinstance(meta[key], str):
            raise trace_error(run, f"{name} {key} must be a string, not {show(meta[key])}")
    for key in schema.META_COUNTERS:
        value = meta[key]
        if value is not None and not (is_int(value) and value >= 0):
            raise trace_error(run, f"{name} {key} must be a non-negative integer or null, not {show(value)}")
    for key in schema.META_OBJECTS:
        if not isinstance(meta[key], dict):
            raise trace_error(run, f"{name} {key} must be a JSON object")
    status = meta.get("status")
    if status is not None and status not in _STATUSES:
        raise trace_error(run, f"{name} status {show(status)} is not one of {', '.join(_STATUSES)}")


def world_size_of(meta: dict | None) -> int | None:
    """The world size a rank's meta.json records (its own key, else its config's), or None."""
    if not meta:
        return None
    config = meta.get("config")
    if not isinstance(config, dict):
        config = {}
    for value in (meta.get("world_size"), config.get("world_size")):
        if is_int(value) and value:
            return value
    return None
