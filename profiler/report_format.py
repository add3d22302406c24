"""What every text report shares: plain JSON-ready values, and aligned columns of text."""

from __future__ import annotations

import math


def plain(value):
    """numpy and pandas scalars to Python ones, NaN and NA to None: json.dumps takes the result."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (int, float, str, bool)):
        return value
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def text_table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Aligned columns: numbers right-aligned, text left-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells):
        return (
            "  "
            + "  ".join(
                str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()
        )

    return [line(headers)] + [line(r) for r in rows]
