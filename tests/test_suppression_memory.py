"""The sender answers suppression checks from memory for an account whose suppression list is
empty, and asks again as soon as an address is added (the SuppressionListChanged event)."""

from __future__ import annotations

import asyncio
import time

import nats
from prometheus_client import REGISTRY

from postmesh.common.clients import MeshClients
from postmesh.feedback.v1 import feedback_pb2
from services.sender.mesh import MeshChecks
from tests.conftest import MeshFactory

SUPPRESSION_CHECK = "/postmesh.feedback.v1.FeedbackService/CheckSuppressedDestinations"


def _calls() -> float:
    sample = REGISTRY.get_sample_value(
        "postmesh_grpc_requests_total", {"method": SUPPRESSION_CHECK, "code": "OK"}
    )
    return sample or 0.0


def test_an_empty_list_is_answered_from_memory_until_an_address_is_added(
    start_mesh: MeshFactory, nats_url: str
) -> None:
    mesh = start_mesh(("identity", "feedback"))
    account_id, key = mesh.create_account()
    other_id, _ = mesh.create_account("other")
    endpoints = dict.fromkeys(("identity", "feedback", "quota"), mesh.address)

    def put(api_key: str, address: str) -> None:
        with mesh.client(api_key) as client:
            client.feedback.PutSuppressedDestination(
                feedback_pb2.PutSuppressedDestinationRequest(
                    email_address=address, reason=feedback_pb2.SUPPRESSION_LIST_REASON_BOUNCE
                )
            )

    async def main() -> None:
        connection = await nats.connect(nats_url)
        clients = MeshClients(endpoints, mesh.service_key)
        checks = MeshChecks(clients)
        await checks.watch(connection)
        try:
            assert await checks.suppressed(account_id, ["a@example.test"]) == []
            assert await checks.suppressed(other_id, ["a@example.test"]) == []
            before = _calls()
            # Known empty: no call to the feedback service.
            assert await checks.suppressed(account_id, ["a@example.test", "b@example.test"]) == []
            assert _calls() == before

            await asyncio.to_thread(put, key, "A@example.test")
            deadline = time.monotonic() + 30
            while await checks.suppressed(account_id, ["a@example.test"]) != ["a@example.test"]:
                assert time.monotonic() < deadline, "the added address was never reported suppressed"
                await asyncio.sleep(0.1)
            # The other account's list is still empty, and still known to be.
            before = _calls()
            assert await checks.suppressed(other_id, ["a@example.test"]) == []
            assert _calls() == before
            # A non-empty list is asked every time.
            assert await checks.suppressed(account_id, ["b@example.test"]) == []
            assert _calls() == before + 1
        finally:
            await checks.close()
            await clients.close()
            await connection.close()

    mesh.run(main(), 120)
