"""Helpers shared by the identity tests."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time

import grpc
import nats
import pytest
from nats.js.api import DeliverPolicy

from postmesh.client import Client, error_details
from postmesh.common.streams import IDENTITY_CHANGED_SUBJECT
from postmesh.events.v1 import events_pb2
from postmesh.identity.v1 import identity_pb2 as pb
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns, Received, SmtpServer

SYSTEM_ACCOUNT_ID = "000000000000"


class FakeClock:
    """A clock tests move forward by hand."""

    def __init__(self) -> None:
        self._now = dt.datetime.now(dt.UTC)
        self._lock = threading.Lock()

    def now(self) -> dt.datetime:
        with self._lock:
            return self._now

    def advance(self, **delta: float) -> None:
        with self._lock:
            self._now += dt.timedelta(**delta)


def internal(mesh: MeshThread) -> Client:
    return Client(mesh.address, mesh.service_key)


def rpc_error(call: object) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()  # type: ignore[operator]
    details = error_details(excinfo.value)
    return details.code, details.reason, details.message, details.metadata


def publish(dns: LoopbackDns, records: object, purpose: str | None = None) -> None:
    for record in records:  # type: ignore[attr-defined]
        if purpose is None or record.purpose == purpose:
            dns.publish(record.name, record.type, record.value)


def create_verified_domain(
    client: Client, dns: LoopbackDns, domain: str, dkim: pb.DkimSigningAttributes | None = None
) -> pb.GetEmailIdentityResponse:
    created = client.identity.CreateEmailIdentity(
        pb.CreateEmailIdentityRequest(email_identity=domain, dkim_signing_attributes=dkim)
    )
    publish(dns, created.dns_records)
    checked = client.identity.CheckEmailIdentityVerification(
        pb.CheckEmailIdentityVerificationRequest(email_identity=domain)
    ).identity
    assert checked.verification_status == pb.VERIFICATION_STATUS_SUCCESS
    return checked


def authorize(
    service: Client, account_id: str, address: str, from_identity: str = ""
) -> pb.AuthorizeSenderResponse:
    return service.identity.AuthorizeSender(
        pb.AuthorizeSenderRequest(account_id=account_id, from_address=address, from_identity=from_identity)
    )


def mail_to(sink: SmtpServer, recipient: str, *, after: int = 0, wait: float = 60.0) -> Received:
    """The first message the SMTP sink received for `recipient` (skipping the first `after`)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        found = [m for m in sink.received if recipient in m.recipients]
        if len(found) > after:
            return found[after]
        time.sleep(0.1)
    raise AssertionError(f"no message for {recipient} arrived")


async def _identity_events(
    nats_url: str, account_id: str, count: int, wait: float
) -> list[events_pb2.IdentityChanged]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.subscribe(
        IDENTITY_CHANGED_SUBJECT, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    found: list[events_pb2.IdentityChanged] = []
    try:
        while len(found) < count and loop.time() < deadline:
            try:
                message = await sub.next_msg(timeout=1)
            except nats.errors.TimeoutError:
                continue
            event = events_pb2.Event.FromString(message.data)
            if event.account_id == account_id:
                found.append(event.identity_changed)
    finally:
        await sub.unsubscribe()
        await nc.close()
    return found


def identity_events(
    nats_url: str, account_id: str, count: int, timeout: float = 30.0
) -> list[events_pb2.IdentityChanged]:
    """The first `count` IdentityChanged events of an account, in order."""
    return asyncio.run(_identity_events(nats_url, account_id, count, timeout))
