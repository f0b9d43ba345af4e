"""The custom MAIL FROM domain's SPF record: `found` says whether the last check saw it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from postmesh.identity.v1 import identity_pb2 as pb
from postmesh.testing_mail import LoopbackDns
from services.identity.verification import spf_covers
from tests.conftest import MeshFactory
from tests.identity_helpers import create_verified_domain

WANTED = "v=spf1 include:spf.postmesh.test ~all"


@pytest.mark.parametrize(
    ("published", "found"),
    [
        ([WANTED], True),
        (["v=spf1 include:spf.postmesh.test -all"], True),  # a stricter default is the owner's choice
        (["V=SPF1 ip4:192.0.2.1 include:spf.postmesh.test ?all"], True),  # merged with the owner's own
        (["v=spf1 include:elsewhere.test ~all"], False),
        (["include:spf.postmesh.test"], False),  # not an SPF record
        (["something else", WANTED], True),
        ([], False),
    ],
)
def test_spf_covers(published: list[str], found: bool) -> None:
    assert spf_covers(published, WANTED) is found


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


def _spf(identity: pb.GetEmailIdentityResponse | pb.PutEmailIdentityMailFromAttributesResponse) -> bool:
    [record] = [r for r in identity.dns_records if r.purpose == "mail-from" and r.type == "TXT"]
    return record.found


def test_the_spf_record_is_found_once_published(start_mesh: MeshFactory, zone: LoopbackDns) -> None:
    mesh = start_mesh(dns_resolver=zone.address, dns_check_poll_seconds=3600, dns_timeout_seconds=2)
    _, key = mesh.create_account()
    with mesh.client(key) as client:
        create_verified_domain(client, zone, "shop.test")
        reply = client.identity.PutEmailIdentityMailFromAttributes(
            pb.PutEmailIdentityMailFromAttributesRequest(
                email_identity="shop.test", mail_from_domain="bounce.shop.test"
            )
        )
        assert not _spf(reply)
        for record in reply.dns_records:
            if record.purpose == "mail-from" and record.type == "MX":
                zone.publish(record.name, record.type, record.value)

        def check() -> pb.GetEmailIdentityResponse:
            client.identity.CheckEmailIdentityVerification(
                pb.CheckEmailIdentityVerificationRequest(email_identity="shop.test")
            )
            return client.identity.GetEmailIdentity(pb.GetEmailIdentityRequest(email_identity="shop.test"))

        assert not _spf(check())  # the MX alone
        [txt] = [r for r in reply.dns_records if r.purpose == "mail-from" and r.type == "TXT"]
        zone.publish(txt.name, txt.type, txt.value)
        assert _spf(check())
        zone.remove("bounce.shop.test", "TXT")
        assert not _spf(check())
