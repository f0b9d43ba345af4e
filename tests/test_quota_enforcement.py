"""Send quota enforcement: the token-bucket rate, the rolling 24-hour window, releases, pauses,
persistence across restarts, and exact limits across sender replicas."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select

from postmesh.client import Client, error_details
from postmesh.common.clients import MeshClients
from postmesh.common.errors import PostmeshError
from postmesh.common.sendquota import SendQuotaClient
from postmesh.quota.v1 import quota_pb2 as pb
from postmesh.testing import MeshThread
from services.quota.models import SendLedgerEntry
from services.quota.service import QuotaService
from tests.conftest import MeshFactory
from tests.quota_helpers import ManualClock, ReplicaResult, SenderReplica

# 23:00 UTC: a calendar day would end an hour in, the rolling window does not.
START = dt.datetime(2026, 3, 1, 23, 0, tzinfo=dt.UTC)


def _reserve(service: Client, account_id: str, messages: int = 1) -> pb.ReserveSendQuotaResponse:
    return service.quota.ReserveSendQuota(
        pb.ReserveSendQuotaRequest(account_id=account_id, messages=messages)
    )


def _refusal(
    service: Client, account_id: str, messages: int = 1
) -> tuple[grpc.StatusCode, str, str, float | None]:
    with pytest.raises(grpc.RpcError) as excinfo:
        _reserve(service, account_id, messages)
    details = error_details(excinfo.value)
    return details.code, details.reason, details.message, details.retry_after_seconds


def _sent(mesh: MeshThread, key: str) -> float:
    with mesh.client(key) as client:
        return client.quota.GetAccount(pb.GetAccountRequest()).send_quota.sent_last_24_hours


def test_rate_is_a_token_bucket_with_one_second_of_burst(start_mesh: MeshFactory) -> None:
    clock = ManualClock(START)
    mesh = start_mesh(clock=clock, sandbox_max_send_rate=5.0)
    account_id, key = mesh.create_account()
    with Client(mesh.address, mesh.service_key) as service:
        assert _reserve(service, account_id, 3).granted_messages == 3  # each recipient counts
        _reserve(service, account_id, 2)
        code, reason, message, retry = _refusal(service, account_id)
        assert (code, reason, message) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "MAX_SEND_RATE_EXCEEDED",
            "Maximum sending rate exceeded.",
        )
        assert retry == pytest.approx(0.2, abs=0.01)
        clock.advance(seconds=0.2)
        _reserve(service, account_id)
        assert _refusal(service, account_id)[1] == "MAX_SEND_RATE_EXCEEDED"
        # Idle time refills the bucket only up to one second of rate.
        clock.advance(seconds=60)
        _reserve(service, account_id, 5)
        assert _refusal(service, account_id)[1] == "MAX_SEND_RATE_EXCEEDED"
        # More recipients than the bucket holds: refused until it is full, then sent, leaving a debt.
        clock.advance(seconds=0.5)
        assert _refusal(service, account_id, 8)[3] == pytest.approx(0.5, abs=0.01)
        clock.advance(seconds=0.5)
        _reserve(service, account_id, 8)
        assert _refusal(service, account_id)[3] == pytest.approx(0.8, abs=0.01)  # 3 owed, then 1
    assert _sent(mesh, key) == 19


def test_rolling_24_hour_window(start_mesh: MeshFactory) -> None:
    clock = ManualClock(START)
    mesh = start_mesh(clock=clock, sandbox_max_send_rate=1000.0)
    account_id, key = mesh.create_account()
    with Client(mesh.address, mesh.service_key) as service:
        _reserve(service, account_id, 150)
        clock.advance(hours=10)  # 09:00 the next calendar day: nothing resets at midnight
        _reserve(service, account_id, 50)
        assert _sent(mesh, key) == 200
        code, reason, message, retry = _refusal(service, account_id)
        assert (code, reason, message) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "DAILY_QUOTA_EXCEEDED",
            "Daily message quota exceeded.",
        )
        assert retry == pytest.approx(14 * 3600, abs=1)  # when the first 150 roll off
        clock.advance(hours=14, seconds=-1)
        assert _refusal(service, account_id)[1] == "DAILY_QUOTA_EXCEEDED"
        assert _sent(mesh, key) == 200
        clock.advance(seconds=2)
        assert _sent(mesh, key) == 50
        _reserve(service, account_id, 150)
        code, reason, _, retry = _refusal(service, account_id)
        assert reason == "DAILY_QUOTA_EXCEEDED"
        assert retry == pytest.approx(10 * 3600 - 1, abs=1)  # when the 50 roll off
        # More than the whole quota at once can never pass: no retry-after is promised.
        clock.advance(hours=30)
        assert _sent(mesh, key) == 0
        assert _refusal(service, account_id, 201)[1:] == (
            "DAILY_QUOTA_EXCEEDED",
            "Daily message quota exceeded.",
            None,
        )


def test_release_gives_back_and_checks_its_arguments(start_mesh: MeshFactory) -> None:
    clock = ManualClock(START)
    mesh = start_mesh(clock=clock, sandbox_max_send_rate=10.0)
    account_id, key = mesh.create_account()
    other_id, other_key = mesh.create_account("other")
    with Client(mesh.address, mesh.service_key) as service:
        reservation = _reserve(service, account_id, 8)
        service.quota.ReleaseSendQuota(
            pb.ReleaseSendQuotaRequest(
                account_id=account_id, reservation_id=reservation.reservation_id, messages=5
            )
        )
        assert _sent(mesh, key) == 3
        _reserve(service, account_id, 7)  # the released messages are back in the bucket too
        assert _refusal(service, account_id)[1] == "MAX_SEND_RATE_EXCEEDED"
        # Releasing more than is left gives back only what is left.
        service.quota.ReleaseSendQuota(
            pb.ReleaseSendQuotaRequest(
                account_id=account_id, reservation_id=reservation.reservation_id, messages=50
            )
        )
        assert _sent(mesh, key) == 7
        bad = [
            (
                pb.ReleaseSendQuotaRequest(
                    account_id=other_id, reservation_id=reservation.reservation_id, messages=1
                ),
                grpc.StatusCode.NOT_FOUND,
                None,
            ),
            (
                pb.ReleaseSendQuotaRequest(account_id=account_id, reservation_id="999999", messages=1),
                grpc.StatusCode.NOT_FOUND,
                None,
            ),
            (
                pb.ReleaseSendQuotaRequest(account_id=account_id, reservation_id="x", messages=1),
                grpc.StatusCode.INVALID_ARGUMENT,
                "reservation_id",
            ),
            (
                pb.ReleaseSendQuotaRequest(account_id=account_id, reservation_id=reservation.reservation_id),
                grpc.StatusCode.INVALID_ARGUMENT,
                "messages",
            ),
            (
                pb.ReleaseSendQuotaRequest(reservation_id=reservation.reservation_id, messages=1),
                grpc.StatusCode.INVALID_ARGUMENT,
                "account_id",
            ),
        ]
        for request, code, field in bad:
            with pytest.raises(grpc.RpcError) as excinfo:
                service.quota.ReleaseSendQuota(request)
            details = error_details(excinfo.value)
            assert details.code == code
            assert details.metadata.get("field") == field
        for reserve, field in [
            (pb.ReserveSendQuotaRequest(account_id=account_id), "messages"),
            (
                pb.ReserveSendQuotaRequest(account_id=account_id, messages=1, lease_messages=-1),
                "lease_messages",
            ),
            (pb.ReserveSendQuotaRequest(messages=1), "account_id"),
        ]:
            with pytest.raises(grpc.RpcError) as excinfo:
                service.quota.ReserveSendQuota(reserve)
            assert error_details(excinfo.value).metadata.get("field") == field
    assert _sent(mesh, other_key) == 0
    # Reservations are internal: an account's own key cannot make or give them back.
    with mesh.client(key) as client, pytest.raises(grpc.RpcError) as excinfo:
        client.quota.ReserveSendQuota(pb.ReserveSendQuotaRequest(account_id=account_id, messages=1))
    assert error_details(excinfo.value).code == grpc.StatusCode.PERMISSION_DENIED


def test_paused_account_is_refused(start_mesh: MeshFactory) -> None:
    mesh = start_mesh()
    account_id, key = mesh.create_account()
    with Client(mesh.address, mesh.service_key) as service, mesh.admin() as admin:
        _reserve(service, account_id)
        admin.quota.PauseAccountSending(
            pb.PauseAccountSendingRequest(account_id=account_id, reason="abuse report")
        )
        code, reason, message, retry = _refusal(service, account_id)
        assert (code, reason, retry) == (grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_SENDING_PAUSED", None)
        assert "paused" in message
        admin.quota.ReinstateAccountSending(
            pb.ReinstateAccountSendingRequest(account_id=account_id, reason="resolved")
        )
    with mesh.client(key) as client:
        reply = client.quota.GetAccount(pb.GetAccountRequest())
    assert reply.sending_enabled and reply.enforcement_status == pb.ENFORCEMENT_STATUS_HEALTHY


def test_quota_survives_a_restart(start_mesh: MeshFactory, nats_url: str, tmp_path: Path) -> None:
    clock = ManualClock(START)
    data_dir = tmp_path / "kept"
    with MeshThread(nats_url=nats_url, data_dir=data_dir, clock=clock, sandbox_max_send_rate=4.0) as first:
        account_id, key = first.create_account()
        with Client(first.address, first.service_key) as service:
            _reserve(service, account_id, 3)
    clock.advance(hours=1)
    second = start_mesh(clock=clock, data_dir=data_dir, sandbox_max_send_rate=4.0)
    with Client(second.address, second.service_key) as service:
        assert _sent(second, key) == 3
        _reserve(service, account_id, 4)
        # The bucket's level was kept too: it is empty now, not refilled by the restart.
        assert _refusal(service, account_id)[1] == "MAX_SEND_RATE_EXCEEDED"
    clock.advance(hours=23, minutes=30)
    assert _sent(second, key) == 4  # the first three rolled off, as they would have without a restart


def test_limits_are_exact_across_replicas(start_mesh: MeshFactory, database_url: str) -> None:
    """With the clock stopped the bucket never refills: three replicas reserving at once get exactly
    one second of rate between them, then exactly the rest of the 24-hour quota."""
    clock = ManualClock(START)
    mesh = start_mesh(
        ("identity", "quota"),
        clock=clock,
        quota_database_url=database_url,
        sandbox_max_send_rate=50.0,
        sandbox_max_24_hour_send=120.0,
    )
    account_id, key = mesh.create_account()
    replicas = [SenderReplica(mesh.address, mesh.service_key) for _ in range(3)]

    def round_of(count: int) -> list[ReplicaResult]:
        results: list[ReplicaResult] = [ReplicaResult()] * len(replicas)

        def run(i: int) -> None:
            results[i] = replicas[i].burst(account_id, count)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(replicas))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return results

    def drain() -> int:
        """Reserves one at a time until refused: what the bucket still held."""
        taken = 0
        with Client(mesh.address, mesh.service_key) as service:
            while True:
                try:
                    _reserve(service, account_id)
                except grpc.RpcError:
                    return taken
                taken += 1

    accepted = sum(r.accepted for r in round_of(40))
    assert 0 < accepted <= 50
    assert accepted + drain() == 50
    assert _sent(mesh, key) == 50
    clock.advance(seconds=1)
    results = round_of(40)
    accepted = sum(r.accepted for r in results)
    assert accepted + drain() == 50
    clock.advance(seconds=1)
    results = round_of(40)
    accepted = sum(r.accepted for r in results)
    assert accepted + drain() == 20  # the 24-hour quota, not the rate, is the limit now
    assert sum(r.reasons.get("DAILY_QUOTA_EXCEEDED", 0) for r in results) > 0
    assert _sent(mesh, key) == 120


def test_three_sender_replicas_share_the_rate(start_mesh: MeshFactory) -> None:
    """MaxSendRate 20 and 10 s of offered load at 100/s from three replicas: at most 20 x 10 + 20
    accepted, and at least 90% of that."""
    mesh = start_mesh(("identity", "quota"), sandbox_max_send_rate=20.0, sandbox_max_24_hour_send=100000.0)
    account_id, key = mesh.create_account()
    replicas = [SenderReplica(mesh.address, mesh.service_key) for _ in range(3)]
    results = [ReplicaResult() for _ in replicas]
    start_at = time.monotonic() + 0.5
    seconds = 10.0
    threads = [
        replica.offer(account_id, per_second=100 / 3, seconds=seconds, start_at=start_at, result=result)
        for replica, result in zip(replicas, results, strict=True)
    ]
    for thread in threads:
        thread.join(60)
    accepted = sum(r.accepted for r in results)
    refused = sum(r.refused for r in results)
    # The last acceptance may land a little after the 10 s when the machine is busy; the bucket may
    # grant for that extra time too, never more.
    elapsed = max(seconds, max(r.last_accept for r in results) - start_at)
    assert accepted <= 20 * elapsed + 20, (accepted, elapsed)
    assert accepted >= 0.9 * (20 * seconds + 20), (accepted, refused)
    assert accepted + refused >= 0.9 * 1000
    assert all(r.accepted > 0 for r in results)  # every replica got a share
    assert set().union(*(r.reasons for r in results)) == {"MAX_SEND_RATE_EXCEEDED"}
    # Every unused lease was given back: the quota service counts exactly what was accepted.
    assert _sent(mesh, key) == accepted


def _ledger_rows(mesh: MeshThread, account_id: str) -> int:
    service = mesh.server.services["quota"] if mesh.server else None
    assert isinstance(service, QuotaService)

    async def count() -> int:
        async with service.runtime.sessions() as session:
            return int(
                await session.scalar(
                    select(func.count())
                    .select_from(SendLedgerEntry)
                    .where(SendLedgerEntry.account_id == account_id)
                )
                or 0
            )

    return mesh.run(count())


def test_busy_replica_leases_and_gives_back_what_it_did_not_use(start_mesh: MeshFactory) -> None:
    mesh = start_mesh(("identity", "quota"), sandbox_max_send_rate=1000.0, sandbox_max_24_hour_send=10000.0)
    account_id, key = mesh.create_account()

    async def main() -> float:
        clients = MeshClients({"quota": mesh.address}, mesh.service_key)
        quota = SendQuotaClient(clients)
        reservations = [await quota.reserve(account_id, 1) for _ in range(60)]
        await quota.release(reservations[-1])  # a rejected message: back into the lease
        await asyncio.sleep(0.6)  # the lease ends (0.2 s): what is left goes back on its own
        sent = await asyncio.to_thread(_sent, mesh, key)
        await clients.close()
        return sent

    assert asyncio.run(main()) == 59
    # Far fewer calls to the quota service than reservations: most came out of leases.
    assert _ledger_rows(mesh, account_id) < 30


def test_housekeeping_keeps_the_rolling_count_right(start_mesh: MeshFactory) -> None:
    clock = ManualClock(START)
    mesh = start_mesh(("identity", "quota"), clock=clock, sandbox_max_send_rate=100.0)
    busy_id, busy_key = mesh.create_account("busy")
    idle_id, idle_key = mesh.create_account("idle")
    service = mesh.server.services["quota"] if mesh.server else None
    assert isinstance(service, QuotaService)
    with Client(mesh.address, mesh.service_key) as client:
        _reserve(client, busy_id, 5)
        _reserve(client, idle_id, 3)
        clock.advance(days=3)
        _reserve(client, busy_id, 1)  # moves the busy account's running count past its old entry
        # The idle account's count still includes its old entry: it must stay until the count drops it.
        assert mesh.run(service.housekeeping.run_once())["ledger"] == 1
        assert (_sent(mesh, busy_key), _sent(mesh, idle_key)) == (1, 0)
        _reserve(client, idle_id, 2)
        assert _sent(mesh, idle_key) == 2
        assert mesh.run(service.housekeeping.run_once())["ledger"] == 1
        assert (_ledger_rows(mesh, busy_id), _ledger_rows(mesh, idle_id)) == (1, 1)


def test_send_quota_client_raises_the_services_refusals(start_mesh: MeshFactory) -> None:
    clock = ManualClock(START)
    mesh = start_mesh(("identity", "quota"), clock=clock, sandbox_max_send_rate=2.0)
    account_id, _ = mesh.create_account()

    def pause() -> None:
        with mesh.admin() as admin:
            admin.quota.PauseAccountSending(pb.PauseAccountSendingRequest(account_id=account_id))

    async def main() -> list[tuple[str, str, float | None]]:
        clients = MeshClients({"quota": mesh.address}, mesh.service_key)
        quota = SendQuotaClient(clients)
        seen = []
        reservation = await quota.reserve(account_id, 2)
        assert not reservation.production_access and reservation.messages == 2
        for _ in range(2):  # the second refusal comes from the client's memory of the first
            try:
                await quota.reserve(account_id, 1)
            except PostmeshError as exc:
                seen.append((type(exc).__name__, exc.reason, exc.retry_after_seconds))
        await quota.release(reservation, 1)
        clock.advance(seconds=1)
        await asyncio.sleep(0.6)  # past the remembered retry-after
        await quota.reserve(account_id, 2)  # 1 given back + 1 refilled... capped at the bucket's 2
        await asyncio.to_thread(pause)
        try:
            await quota.reserve(account_id, 1)
        except PostmeshError as exc:
            seen.append((type(exc).__name__, exc.reason, exc.retry_after_seconds))
        await quota.close()
        await clients.close()
        return seen

    seen = asyncio.run(main())
    assert seen[0] == ("ResourceExhausted", "MAX_SEND_RATE_EXCEEDED", pytest.approx(0.5, abs=0.01))
    assert seen[1][:2] == ("ResourceExhausted", "MAX_SEND_RATE_EXCEEDED") and 0 < (seen[1][2] or 0) <= 0.5
    assert seen[2] == ("FailedPrecondition", "ACCOUNT_SENDING_PAUSED", None)
