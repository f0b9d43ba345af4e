"""Mail postmesh sends on its own behalf (address verification, account notices) leaves as SendEmail's
does: the same Message-ID form, standard mail, and a title that says what happened."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from email import message_from_bytes, policy

import pytest

from postmesh.identity.v1 import identity_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.testing_mail import SmtpServer
from tests.conftest import MeshFactory
from tests.delivery_helpers import forget_delivery_consumer
from tests.fuzz_helpers import check_wire_message
from tests.identity_helpers import mail_to

MESSAGE_ID = re.compile(
    r"^<[0-9a-f]{16}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-000000@mail\.postmesh\.test>$"
)


@pytest.fixture
def sink(nats_url: str) -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server
    asyncio.run(forget_delivery_consumer(nats_url))


def test_verification_mail_and_account_notices_leave_as_sent_mail_does(
    start_mesh: MeshFactory, sink: SmtpServer
) -> None:
    mesh = start_mesh(
        verification_mail_from="verify@system.test",
        message_id_domain="mail.postmesh.test",
        delivery_workers=2,
        delivery_mode="smarthost",
        smarthost=f"127.0.0.1:{sink.port}",
        smarthost_tls="none",
    )
    _, key = mesh.create_account()
    address = f"ann.{uuid.uuid4().hex[:8]}@home.test"
    contact = f"ops.{uuid.uuid4().hex[:8]}@shop.test"
    with mesh.client(key) as client, mesh.admin() as admin:
        client.identity.CreateEmailIdentity(identity_pb2.CreateEmailIdentityRequest(email_identity=address))
        filed = client.quota.PutAccountDetails(
            quota_pb2.PutAccountDetailsRequest(
                mail_type=quota_pb2.MAIL_TYPE_TRANSACTIONAL,
                website_url="https://shop.example.test",
                use_case_description="Order confirmations and password resets for our customers.",
                additional_contact_email_addresses=[contact],
                production_access_enabled=True,
                expected_daily_volume=5000,
            )
        ).review_details
        admin.quota.GrantProductionAccess(quota_pb2.GrantProductionAccessRequest(case_id=filed.case_id))

    verification = mail_to(sink, address)
    notice = mail_to(sink, contact)
    for received in (verification, notice):
        check_wire_message(received.data, bcc=[])
        assert MESSAGE_ID.match(received.message_id), received.message_id
    subject = str(message_from_bytes(notice.data, policy=policy.default)["Subject"])
    assert subject.endswith(": production access granted"), subject
