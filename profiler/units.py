"""Byte sizes as people write them: "2 GiB", "512 MiB", "1.5GB", or plain bytes."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value) -> int:
    """Bytes from an int or a string such as "2 GiB", "512 MiB", "1.5GB" (ValueError if not one).

    Binary units (KiB, MiB, GiB, and bare K/M/G) are powers of 1024; KB/MB/GB are powers of 1000.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value!r}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"not a size: {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"not a size: {value!r} (expected bytes as an int, or e.g. '512 MiB', '2 GiB', '1.5GB')")


_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int | None) -> str:
    """Bytes in binary units, two decimals ("9.65 GiB", "512 B"); "n/a" for None."""
    if n is None:
        return "n/a"
    value, unit = float(abs(n)), 0
    while value >= 1024 and unit < len(_BINARY) - 1:
        value /= 1024
        unit += 1
    sign = "-" if n < 0 else ""
    return f"{sign}{int(value)} B" if unit == 0 else f"{sign}{value:.2f} {_BINARY[unit]}"


def exact_bytes(n: int | None) -> str:
    """Human and exact: "9.65 GiB (10,360,304,640 B)", so a figure can be checked against torch's."""
    return "n/a" if n is None else f"{human_bytes(n)} ({n:,} B)"
