"""The arithmetic and parsing of `make bench` (postmesh.bench_report), and how it tells that a
process listens on a port (postmesh.bench_proc); no timing here."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest

from postmesh.bench_proc import listens_on
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


def test_a_process_listens_on_a_port_once_it_called_listen() -> None:
    """The bench waits for every worker of `serve all` to listen on the shared port: a socket bound
    but not listening does not count, nor a port another process listens on."""
    with socket.socket() as ours:
        ours.bind(("127.0.0.1", 0))
        port = ours.getsockname()[1]
        assert not listens_on(os.getpid(), port)
        ours.listen()
        assert listens_on(os.getpid(), port)
        assert not listens_on(os.getpid(), port + 1 if port < 65535 else port - 1)
        other = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen();"
                " print(s.getsockname()[1], flush=True); sys.stdin.read()",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert other.stdout is not None
            their_port = int(other.stdout.readline())
            assert listens_on(other.pid, their_port)
            assert not listens_on(os.getpid(), their_port)
            assert not listens_on(other.pid, port)
        finally:
            other.kill()
            other.wait()
