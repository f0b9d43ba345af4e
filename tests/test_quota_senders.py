"""The quota acceptance test with real sender replicas: three `sender`-only meshes call SendEmail for
one account whose MaxSendRate is 20, with 10 s of offered load at 100 messages/s."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from postmesh.client import error_details
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.sender.v1 import sender_pb2_grpc
from postmesh.testing_mail import LoopbackDns
from tests.conftest import MeshFactory
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import own_nats_server

RATE, SECONDS, OFFERED_PER_SECOND = 20.0, 10.0, 100.0


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    # Accepted messages stay on the work queue (no delivery workers): keep them off the suite's server.
    with own_nats_server(tmp_path / "nats") as url:
        yield url


def _offer(
    address: str, api_key: str, start_at: float, per_second: float, outcome: Counter[str]
) -> threading.Thread:
    """Calls SendEmail on one replica at a steady pace, each call in flight on its own."""

    async def main() -> None:
        async with aio.insecure_channel(address) as channel:
            stub = sender_pb2_grpc.SenderServiceStub(channel)
            metadata = (("authorization", f"Bearer {api_key}"),)

            async def one(n: int) -> None:
                request = pb.SendEmailRequest(
                    from_email_address="news@rate.test",
                    destination=pb.Destination(to_addresses=[f"user{n}@rate.test"]),
                    content=pb.EmailContent(
                        simple=pb.Message(
                            subject=pb.Content(data="hi"), body=pb.Body(text=pb.Content(data="x"))
                        )
                    ),
                )
                try:
                    await stub.SendEmail(request, metadata=metadata, timeout=60)
                    outcome["accepted"] += 1
                    outcome["last_accept_ms"] = max(outcome["last_accept_ms"], int(time.monotonic() * 1000))
                except grpc.RpcError as exc:
                    outcome[error_details(exc).reason or exc.code().name] += 1

            tasks = []
            for n in range(int(per_second * SECONDS)):
                delay = start_at + n / per_second - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n)))
            await asyncio.gather(*tasks)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    return thread


def test_three_sender_replicas_hold_the_account_to_its_rate(start_mesh: MeshFactory, nats_url: str) -> None:
    with LoopbackDns() as zone:
        core = start_mesh(
            ("identity", "quota", "feedback"),
            sandbox_max_send_rate=RATE,
            sandbox_max_24_hour_send=100_000.0,
            dns_resolver=zone.address,
            dns_check_poll_seconds=3600,
        )
        shared = {
            "identity_endpoint": core.address,
            "quota_endpoint": core.address,
            "feedback_endpoint": core.address,
            "admin_api_key": core.admin_key,
            "service_api_key": core.service_key,
            "delivery_workers": 0,
        }
        replicas = [start_mesh(("sender",), **shared) for _ in range(3)]
        _, key = core.create_account()
        with core.client(key) as client:
            create_verified_domain(
                client, zone, "rate.test"
            )  # sandbox: sender and recipients at a verified domain
        outcomes = [Counter[str]() for _ in replicas]
        start_at = time.monotonic() + 1.0
        threads = [
            _offer(replica.address, key, start_at, OFFERED_PER_SECOND / len(replicas), outcome)
            for replica, outcome in zip(replicas, outcomes, strict=True)
        ]
        for thread in threads:
            thread.join(120)
        accepted = sum(o["accepted"] for o in outcomes)
        refused = Counter[str]()
        for outcome in outcomes:
            refused.update({k: v for k, v in outcome.items() if k not in ("accepted", "last_accept_ms")})
        # A busy machine may land the last acceptance after the 10 s; the bucket grants for that time too.
        last = max(o["last_accept_ms"] for o in outcomes) / 1000
        elapsed = max(SECONDS, last - start_at)
        print(f"\naccepted {accepted}, refused {dict(refused)}, over {elapsed:.1f}s")
        assert accepted <= RATE * elapsed + RATE, (accepted, elapsed)
        assert accepted >= 0.9 * (RATE * SECONDS + RATE), (accepted, refused)
        offered = len(replicas) * int(OFFERED_PER_SECOND / len(replicas) * SECONDS)  # 999 calls
        assert accepted + sum(refused.values()) == offered
        assert set(refused) == {"MAX_SEND_RATE_EXCEEDED"}, refused
        assert all(o["accepted"] > 0 for o in outcomes)  # every replica got a share
        for replica in replicas:
            replica.stop()  # gives back the replicas' unused leases
        with core.client(key) as client:
            deadline = time.monotonic() + 15
            while (
                client.quota.GetAccount(quota_pb2.GetAccountRequest()).send_quota.sent_last_24_hours
                != accepted
            ):
                assert time.monotonic() < deadline, (
                    "the quota service's count never matched what was accepted"
                )
                time.sleep(0.2)
