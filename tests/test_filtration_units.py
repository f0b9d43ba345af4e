"""The filtration parts without a real scanner: reply parsing against hostile bytes, the spam policy,
and scanners that hang, answer garbage or are not there (each must become "unavailable", never a
crash and never a clean verdict)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from postmesh.sender.v1 import queue_pb2
from services.sender.filtration.clamd import ClamdClient, Endpoint, ScannerUnavailable, parse_reply
from services.sender.filtration.policy import Action, DefaultPolicy, SpamPolicy, judge_spam
from services.sender.filtration.rspamd import RspamdClient, _split_response, parse_result
from services.sender.filtration.stage import ContentFilters, Kind

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@given(st.binary(max_size=300))
def test_any_clamd_reply_is_a_verdict_or_unavailable(reply: bytes) -> None:
    try:
        result = parse_reply(reply)
    except ScannerUnavailable:
        return
    assert result is None or (isinstance(result, str) and result)


@given(st.binary(max_size=300))
def test_any_rspamd_response_is_a_score_or_unavailable(response: bytes) -> None:
    try:
        result = parse_result(*_split_response(response))
    except ScannerUnavailable:
        return
    assert isinstance(result.score, float)


def test_clamd_replies() -> None:
    assert parse_reply(b"stream: OK\0") is None
    assert parse_reply(b"stream: Win.Test.EICAR_HDB-1 FOUND\0") == "Win.Test.EICAR_HDB-1"
    assert (
        parse_reply(b"INSTREAM size limit exceeded. ERROR\0") == "Heuristics.Limits.Exceeded.StreamMaxLength"
    )
    for garbage in (b"", b"stream: FOUND", b"PONG", b"stream: ERROR", b"\xff\xfe"):
        with pytest.raises(ScannerUnavailable):
            parse_reply(garbage)


def test_endpoints() -> None:
    assert Endpoint.parse("tcp://127.0.0.1:3310", 1) == Endpoint("127.0.0.1", 3310)
    assert Endpoint.parse("127.0.0.1", 3310) == Endpoint("127.0.0.1", 3310)
    assert Endpoint.parse("unix:///run/clamav/clamd.ctl", 3310) == Endpoint(path="/run/clamav/clamd.ctl")
    assert Endpoint.parse("[::1]:11333", 1) == Endpoint("::1", 11333)


@given(st.floats(allow_nan=False, allow_infinity=False), st.floats(min_value=0, max_value=100))
def test_spam_policy(score: float, threshold: float) -> None:
    assert judge_spam(score, SpamPolicy("tag", threshold)) is Action.PASS
    assert judge_spam(score, SpamPolicy("off", threshold)) is Action.PASS
    above = score > threshold
    assert (judge_spam(score, SpamPolicy("hold", threshold)) is Action.HOLD) == above
    assert (judge_spam(score, SpamPolicy("reject", threshold)) is Action.REJECT) == above


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        SpamPolicy("quarantine")


async def _server(serve: Serve) -> AsyncIterator[int]:
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.fixture
async def hanging() -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await asyncio.sleep(3600)

    async for port in _server(serve):
        yield port


@pytest.fixture
async def garbage() -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(64)
        writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"score": "lots"}')
        await writer.drain()
        writer.close()

    async for port in _server(serve):
        yield port


@pytest.fixture
def closed_port() -> int:
    from postmesh.common.natsserver import free_port

    return free_port("127.0.0.1")


async def test_a_hanging_scanner_times_out(hanging: int) -> None:
    with pytest.raises(ScannerUnavailable, match="did not answer"):
        await ClamdClient(f"127.0.0.1:{hanging}", timeout=0.5).scan(b"x" * 100)
    with pytest.raises(ScannerUnavailable, match="did not answer"):
        await RspamdClient(f"http://127.0.0.1:{hanging}", timeout=0.5).check(
            b"x", sender="a@x.test", recipients=["b@y.test"], queue_id="q"
        )


async def test_garbage_and_absent_scanners_are_unavailable(garbage: int, closed_port: int) -> None:
    for port in (garbage, closed_port):
        with pytest.raises(ScannerUnavailable):
            await ClamdClient(f"127.0.0.1:{port}", timeout=5).scan(b"x")
        with pytest.raises(ScannerUnavailable):
            await RspamdClient(f"127.0.0.1:{port}", timeout=5).check(
                b"x", sender="a@x.test", recipients=[], queue_id="q"
            )
    assert not await ClamdClient(f"127.0.0.1:{closed_port}", timeout=1).ping()


async def test_down_scanners_defer_except_spam_when_fail_open(closed_port: int) -> None:
    queued = queue_pb2.QueuedMessage(message_id="m1", account_id="a1", recipients=["b@y.test"])
    down = f"127.0.0.1:{closed_port}"
    tag = DefaultPolicy(SpamPolicy("tag"))

    closed = ContentFilters(clamd=None, rspamd=RspamdClient(down, timeout=1), policies=tag)
    verdict = await closed.check(queued, b"x")
    assert verdict.kind is Kind.DEFER and verdict.details.startswith("spam scanner unavailable")

    open_ = ContentFilters(
        clamd=None, rspamd=RspamdClient(down, timeout=1), policies=tag, spam_fail_open=True
    )
    verdict = await open_.check(queued, b"x")
    assert verdict.kind is Kind.PASS and verdict.filtration.spam_unscanned
    queued.filtration.CopyFrom(verdict.filtration)
    assert not open_.pending(queued)  # not scored later either: it went out unscored, and says so

    # Never fail-open for viruses.
    virus = ContentFilters(clamd=ClamdClient(down, timeout=1), rspamd=None, policies=tag, spam_fail_open=True)
    verdict = await virus.check(queue_pb2.QueuedMessage(message_id="m2"), b"x")
    assert verdict.kind is Kind.DEFER and verdict.details.startswith("virus scanner unavailable")
    # The metrics say so.
    assert REGISTRY.get_sample_value("postmesh_filtration_scanner_up", {"filter": "virus"}) == 0
    assert (REGISTRY.get_sample_value("postmesh_filtration_deferred_total", {"filter": "virus"}) or 0) >= 1
    assert await virus.probe() == {"virus": False}
