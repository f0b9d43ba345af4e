"""The arithmetic and parsing of `make bench` (postmesh.bench_report); no timing here."""

from __future__ import annotations

import math

import pytest

from postmesh.bench_report import markdown_table, parse_counts, per_message_ms, percentile, ratio


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(n) for n in range(100, 0, -1)]  # 100 .. 1, unsorted
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7.0], 0.99) == 7
    assert math.isnan(percentile([], 0.5))


def test_process_counts_are_a_comma_list() -> None:
    assert parse_counts("1,2") == [1, 2]
    assert parse_counts("2") == [2]
    assert parse_counts("0, 4") == [0, 4]
    for wrong in ("", "one", "1,-2"):
        with pytest.raises(ValueError):
            parse_counts(wrong)


def test_per_message_and_ratio() -> None:
    assert per_message_ms(1.5, 1000) == 1.5
    assert math.isnan(per_message_ms(1.0, 0))
    assert ratio(600.0, 200.0) == "3.00x"
    assert ratio(600.0, 0.0) == "n/a"


def test_the_table_is_markdown_with_aligned_columns() -> None:
    table = markdown_table(["measure", "1 process"], [["accepted", "250/s"], ["CPU per message", "3.1 ms"]])
    lines = table.splitlines()
    assert lines[0] == "| measure         | 1 process |"
    assert lines[1] == "| --------------- | --------: |"
    assert lines[3] == "| CPU per message |    3.1 ms |"
    assert len({len(line) for line in lines}) == 1
