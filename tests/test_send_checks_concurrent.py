"""The sender's per-message checks under concurrency: coalesced calls still answer each message
for its own recipients, and busy quota leases (refilled in the background) are all accounted for."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from postmesh.common.clients import MeshClients
from postmesh.common.errors import ResourceExhausted
from postmesh.common.sendquota import SendQuotaClient
from postmesh.feedback.v1 import feedback_pb2
from postmesh.quota.v1 import quota_pb2
from services.sender.mesh import MeshChecks
from tests.conftest import MeshFactory

SUPPRESSION_CHECK = "/postmesh.feedback.v1.FeedbackService/CheckSuppressedDestinations"


def _calls(method: str) -> float:
    return REGISTRY.get_sample_value("postmesh_grpc_requests_total", {"method": method, "code": "OK"}) or 0.0


def test_concurrent_checks_go_together_and_each_gets_its_own_answer(start_mesh: MeshFactory) -> None:
    mesh = start_mesh(("identity", "feedback"))
    account_id, key = mesh.create_account()
    other_id, other_key = mesh.create_account("other")
    with mesh.client(key) as client:
        for n in range(0, 60, 3):
            client.feedback.PutSuppressedDestination(
                feedback_pb2.PutSuppressedDestinationRequest(
                    email_address=f"user{n}@example.test", reason=feedback_pb2.SUPPRESSION_LIST_REASON_BOUNCE
                )
            )
    with mesh.client(other_key) as client:  # another account's list does not count for this one
        client.feedback.PutSuppressedDestination(
            feedback_pb2.PutSuppressedDestinationRequest(
                email_address="user1@example.test", reason=feedback_pb2.SUPPRESSION_LIST_REASON_BOUNCE
            )
        )
    endpoints = dict.fromkeys(("identity", "feedback", "quota"), mesh.address)

    async def main() -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
        clients = MeshClients(endpoints, mesh.service_key)
        checks = MeshChecks(clients)
        # Each message: its own recipient, in the case its sender wrote, plus one never suppressed.
        recipients = [[f"User{n}@example.test", f"fresh{n}@example.test"] for n in range(60)]
        suppressed = await asyncio.gather(*(checks.suppressed(account_id, r) for r in recipients))
        others = await asyncio.gather(*(checks.suppressed(other_id, r) for r in recipients[:3]))
        unverified = await asyncio.gather(*(checks.unverified_recipients(account_id, r) for r in recipients))
        await checks.close()
        await clients.close()
        return list(suppressed), list(others), list(unverified)

    before = _calls(SUPPRESSION_CHECK)
    suppressed, others, unverified = mesh.run(main())
    assert suppressed == [[f"User{n}@example.test"] if n % 3 == 0 else [] for n in range(60)]
    assert others == [[], ["User1@example.test"], []]
    # No identity is verified: every recipient of every message is reported, as its sender wrote it.
    assert unverified == [[f"User{n}@example.test", f"fresh{n}@example.test"] for n in range(60)]
    # 63 checks, far fewer calls: concurrent checks of an account share one.
    assert _calls(SUPPRESSION_CHECK) - before <= 10


def test_busy_concurrent_reservations_are_all_accounted_for(start_mesh: MeshFactory) -> None:
    """64 concurrent senders reserving as fast as they can (leases sized by the waiting demand and
    refilled in the background): once the client closes, the service counts exactly what was granted."""
    mesh = start_mesh(("identity", "quota"), sandbox_max_send_rate=2000.0, sandbox_max_24_hour_send=100000.0)
    account_id, key = mesh.create_account()

    async def main() -> tuple[int, set[str]]:
        clients = MeshClients({"quota": mesh.address}, mesh.service_key)
        quota = SendQuotaClient(clients)
        granted = 0
        reasons: set[str] = set()

        async def sender() -> None:
            nonlocal granted
            for _ in range(40):
                try:
                    await quota.reserve(account_id, 1)
                    granted += 1
                except ResourceExhausted as exc:
                    reasons.add(exc.reason)

        await asyncio.gather(*(sender() for _ in range(64)))
        await quota.close()
        await clients.close()
        return granted, reasons

    granted, reasons = mesh.run(main())
    assert granted > 0 and reasons <= {"MAX_SEND_RATE_EXCEEDED"}
    with mesh.client(key) as client:
        sent = client.quota.GetAccount(quota_pb2.GetAccountRequest()).send_quota.sent_last_24_hours
    assert sent == granted
