"""meta.json, read here and only here: read_meta() checks it as the reader needs it,
read_meta_lenient() takes whatever JSON object is there (labels for a run that cannot be read),
run_status() says whether a run without a final status is still being written.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from profiler.errors import TraceVersionError
from profiler.trace import schema
from profiler.trace.problems import is_int, read_small, reading, show, trace_error

INT64_END = 1 << 63  # counters are stored and summed as int64
_STATUSES = tuple(s.value for s in schema.Status)


def read_meta(run_dir) -> dict:
    """meta.json of a run, checked (schema.META_KEYS); a TraceError says what is wrong."""
    run = Path(run_dir)
    meta_path = run / schema.META_FILE
    if not meta_path.is_file():
        raise trace_error(run, f"not a vramscope trace (no {schema.META_FILE})")
    with reading(run, schema.META_FILE):
        raw = read_small(meta_path)
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
        meta = json.loads(read_small(Path(run_dir) / schema.META_FILE))
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
        if value is not None and not (is_int(value) and 0 <= value < INT64_END):
            raise trace_error(run, f"{name} {key} must be an integer in 0..2^63-1 or null, not {show(value)}")
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


# -- whether a run is still being written ----------------------------------------------

RUNNING = "running"
RUNNING_ELSEWHERE = "running?"  # no final status, and its process is on another host: unknown
DIED = "died"  # no final status, and its process is gone: killed (SIGKILL, the OOM killer) or crashed
# A process that started this long after the capture did holds a reused pid. The slack absorbs
# the whole-second boot time the start is computed from, and wall-clock steps since.
_PID_REUSE_SLACK_S = 60.0


def run_status(meta: dict | None) -> str:
    """The status to show for a run: the final one meta.json records (complete, oom, error,
    terminated, capture_failed); else running while the capture's process (meta's pid, on meta's
    hostname) is alive, died once it is gone, and running? when that cannot be checked from here
    (another host, no pid recorded)."""
    meta = meta if isinstance(meta, dict) else {}
    status = meta.get("status")
    if isinstance(status, str) and status:
        return status
    pid, host = meta.get("pid"), meta.get("hostname")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or host != socket.gethostname():
        return RUNNING_ELSEWHERE
    if os.name != "posix":
        return RUNNING_ELSEWHERE  # signal 0 is a probe on POSIX only
    return RUNNING if process_alive(pid, meta.get("started_at")) else DIED


def process_alive(pid: int, started_at=None) -> bool:
    """Whether process `pid` of this host runs (POSIX): signal 0 probes it; on Linux, /proc also
    tells a zombie (killed, not yet reaped) and a reused pid (a process started after `started_at`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    except OSError:
        return True  # cannot tell: do not declare it dead
    found = _proc_state(pid)
    if found is None:
        return True  # no /proc (macOS): signal 0 said it exists
    state, started = found
    if state in ("Z", "X"):
        return False
    return not (isinstance(started_at, (int, float)) and started > started_at + _PID_REUSE_SLACK_S)


def process_started_at(pid: int) -> float | None:
    """When process `pid` of this host started (epoch seconds), from /proc; None without it."""
    found = _proc_state(pid)
    return None if found is None else found[1]


def _proc_state(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in epoch seconds) of a process, from /proc; None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # the name, in parentheses, may hold spaces
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
        # stat(5): field 3 is the state, field 22 the start in clock ticks since boot.
        return fields[0].decode(), boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
