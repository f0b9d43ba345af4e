"""The arithmetic and the table of `make bench`: percentiles, the --processes list, and a Markdown
table with one column per shape of the mesh measured (ready to paste into docs/performance.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (fraction 0.99: p99) of `values`; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def parse_counts(text: str) -> list[int]:
    """`--processes 1,2`: process counts, each 0 or more (0: one per core), in the order given."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"not a list of process counts: {text!r}") from None
    if not counts or any(n < 0 for n in counts):
        raise ValueError(f"not a list of process counts: {text!r}")
    return counts


def per_message_ms(cpu_seconds: float, messages: int) -> float:
    """CPU milliseconds per message; NaN when nothing was measured."""
    return cpu_seconds * 1000 / messages if messages else float("nan")


def rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}/s"


def ms(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"


def mb(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f} MB"


def ratio(value: float, peer: float) -> str:
    return f"{value / peer:.2f}x" if peer > 0 and not math.isnan(value) else "n/a"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table whose columns are padded to their widest cell (the first left-aligned, the
    others right-aligned)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
