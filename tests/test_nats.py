"""JetStream set-up is idempotent across restarts; services wait for NATS, NOT_SERVING until it comes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import nats
import pytest
from nats.js.errors import InvalidKeyError

from postmesh.common.bus import ensure_streams, fetch_batch
from postmesh.common.natsserver import NatsServerProcess, free_port
from postmesh.common.outbound import first_copy, queued_ledger
from postmesh.common.streams import ALL_STREAMS, EVENTS, OUTBOUND
from postmesh.quota.v1 import quota_pb2
from postmesh.testing import MeshThread
from tests.conftest import MeshFactory


async def _stream_state(url: str) -> dict[str, tuple[list[str], str, int]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        states = {}
        for spec in ALL_STREAMS:
            info = await js.stream_info(spec.name)
            retention = info.config.retention
            states[spec.name] = (list(info.config.subjects or []), str(retention), info.state.messages)
        return states
    finally:
        await nc.close()


async def _publish_and_redeclare(url: str) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        await js.publish("postmesh.events.test.kept", b"x")
        await ensure_streams(js)  # again: the message must survive, nothing is recreated
    finally:
        await nc.close()


def test_streams_declared_idempotently_across_restarts(start_mesh: MeshFactory, tmp_path: Path) -> None:
    server = NatsServerProcess(tmp_path / "nats").start()
    try:
        first = start_mesh(nats_url=server.url)
        asyncio.run(_publish_and_redeclare(server.url))
        first.stop()
        before = asyncio.run(_stream_state(server.url))
        # A restarted mesh, then a restarted nats-server with the same store: same streams, same data.
        start_mesh(nats_url=server.url).stop()
        server.stop()
        server.start()
        start_mesh(nats_url=server.url)
        after = asyncio.run(_stream_state(server.url))
    finally:
        server.stop()
    assert before == after
    assert after[EVENTS.name][0] == ["postmesh.events.>"]
    assert "WORK_QUEUE" in after[OUTBOUND.name][1].upper() or "workqueue" in after[OUTBOUND.name][1]
    assert after[EVENTS.name][2] >= 1


def test_not_serving_until_nats_is_reachable(start_mesh: MeshFactory, tmp_path: Path) -> None:
    port = free_port()
    mesh: MeshThread = start_mesh(nats_url=f"nats://127.0.0.1:{port}", wait_ready=False)
    account_key = "pm_abc_def"
    with mesh.client(account_key) as client:
        time.sleep(1.0)  # several connection attempts fail meanwhile
        assert client.health_status("") == "NOT_SERVING"
        assert client.health_status("postmesh.quota.v1.QuotaService") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as excinfo:
            client.quota.GetAccount(quota_pb2.GetAccountRequest())
        assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
        server = NatsServerProcess(tmp_path / "late-nats", port=port).start()
        try:
            deadline = time.monotonic() + 30
            while client.health_status("") != "SERVING":
                assert time.monotonic() < deadline, "mesh never became SERVING after NATS came up"
                time.sleep(0.1)
            _, key = mesh.create_account()
            with mesh.client(key) as account:
                assert account.quota.GetAccount(quota_pb2.GetAccountRequest()).sending_enabled
        finally:
            mesh.stop()
            server.stop()


def test_not_serving_while_its_database_is_unreachable(start_mesh: MeshFactory) -> None:
    # quota's database points at a port where nothing listens; the other services are fine.
    dead = f"postgresql+asyncpg://postmesh@127.0.0.1:{free_port()}/postmesh"
    mesh = start_mesh(quota_database_url=dead, wait_ready=False)
    with mesh.client() as client:
        deadline = time.monotonic() + 30
        while client.health_status("postmesh.identity.v1.IdentityService") != "SERVING":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)  # quota keeps retrying meanwhile
        assert client.health_status("postmesh.quota.v1.QuotaService") == "NOT_SERVING"
        assert client.health_status("") == "NOT_SERVING"
    _, key = mesh.create_account()
    with mesh.client(key) as account, pytest.raises(grpc.RpcError) as excinfo:
        account.quota.GetAccount(quota_pb2.GetAccountRequest())
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE


class _SwallowingSubscription:
    """Behaves as nats-py's fetch does on Python 3.11 when a cancellation meets its timeout:
    asyncio.wait_for turns the cancellation into a TimeoutError."""

    async def fetch(self, batch: int, timeout: float) -> list[object]:  # noqa: ASYNC109 - nats-py's signature
        try:
            await asyncio.sleep(timeout)
        except asyncio.CancelledError:
            raise TimeoutError from None
        raise TimeoutError


def test_a_fetch_loop_stops_when_cancelled_even_if_fetch_swallows_the_cancellation() -> None:
    async def loop() -> None:
        while True:
            await fetch_batch(_SwallowingSubscription(), 10, wait_seconds=30)  # type: ignore[arg-type]

    async def main() -> None:
        task = asyncio.create_task(loop())
        await asyncio.sleep(0.05)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done and task.cancelled()

    asyncio.run(main())


def test_fetch_batch_returns_nothing_on_a_plain_timeout() -> None:
    async def main() -> int:
        return len(await fetch_batch(_SwallowingSubscription(), 10, wait_seconds=0.01))  # type: ignore[arg-type]

    assert asyncio.run(main()) == 0


async def test_the_queued_ledger_keeps_the_first_copy_of_a_message_id(nats_url: str) -> None:
    """A message queued twice under one id (a retry after the duplicate window) is delivered once:
    the copy a worker took first wins; that same copy handed out again is still the first."""
    connection = await nats.connect(nats_url)
    try:
        ledger = await queued_ledger(connection.jetstream())
        message_id = f"ledger-{time.monotonic_ns()}"
        assert await first_copy(ledger, message_id, 17)
        assert await first_copy(ledger, message_id, 17)  # redelivered after a worker died
        assert not await first_copy(ledger, message_id, 42)  # a second copy
        assert await first_copy(await queued_ledger(connection.jetstream()), f"{message_id}-2", 42)
    finally:
        await connection.close()


async def test_the_queued_ledger_takes_a_deleted_key_again_and_refuses_an_invalid_one(nats_url: str) -> None:
    """As nats-py's KeyValue.create: a key deleted (a tombstone left) is created again, and a message id
    that cannot be a key is refused before anything is published."""
    connection = await nats.connect(nats_url)
    try:
        ledger = await queued_ledger(connection.jetstream())
        message_id = f"ledger-deleted-{time.monotonic_ns()}"
        assert await first_copy(ledger, message_id, 17)
        await ledger.delete(message_id)
        assert await first_copy(ledger, message_id, 42)
        assert (await ledger.get(message_id)).value == b"42"
        assert not await first_copy(ledger, message_id, 17)
        with pytest.raises(InvalidKeyError):
            await first_copy(ledger, "not a key*", 1)
    finally:
        await connection.close()
