"""Open and click tracking: HTML parts rewritten before signing (text parts and attachments kept byte
for byte, MIME valid whatever the HTML), signed tokens, and end to end a delivered message whose link
and pixel, fetched over HTTP, become Click and Open events while its DKIM signatures still verify."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import email.policy
import json
import quopri
import re
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import dkim
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmesh.common.bus import EventPublisher, ensure_streams, new_event
from postmesh.common.natsserver import free_port
from postmesh.common.outbound import enqueue
from postmesh.common.service import SystemClock
from postmesh.common.tracking import BadToken, TokenSigner, TrackedMail, tracking_base
from postmesh.events.v1 import events_pb2 as ev
from postmesh.events.v1 import tracking_pb2 as tracking_events
from postmesh.identity.v1 import identity_pb2
from postmesh.sender.v1 import tracking_pb2
from postmesh.testing_mail import LoopbackDns, SmtpServer
from services.feedback.destinations.sesjson import event_record
from services.feedback.tracking.http import TrackingServer
from services.feedback.tracking.recorder import TrackingRecorder
from services.sender.tracking import Tracker, rewrite_html
from tests.conftest import MeshFactory
from tests.delivery_helpers import EmailEvents, forget_delivery_consumer, queued_message
from tests.dkim_verifiers import dkimpy_dns, perl_dkim_available, perl_dkim_result

SECRET = "test-tracking-secret"
# AWS's own event records, in the shared folder beside the repository.
SES_EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "ses-event-examples"
if not SES_EXAMPLES.is_dir():
    SES_EXAMPLES = Path("/work/shared/ses-event-examples")
BASE = "https://track.example.test"
BOTH = tracking_pb2.TrackingOptions(opens=True, clicks=True)
TRACKED = re.compile(r"https://track\.example\.test/([oc])/([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)")

HTML = (
    "<!doctype html><html><body><p>Bonjour Andr\u00e9,</p>"
    '<a href="https://shop.example.test/a?x=1&amp;y=2" ses:tags="campaign:spring;slot:top">Shop</a> '
    "<A HREF=http://plain.example.test/>Plain</A> "
    '<a ses:no-track href="https://untracked.example.test/">Not me</a> '
    '<a href="mailto:help@example.test">Mail</a> <a href="#top">Top</a>'
    "</body></html>"
)


def _message(html_cte: str, charset: str = "iso-8859-1", html: str = HTML) -> bytes:
    raw = html.encode(charset, "surrogateescape")
    if html_cte == "base64":
        body = base64.encodebytes(raw)
    elif html_cte == "quoted-printable":
        body = quopri.encodestring(raw.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    else:
        body = raw
    return (
        b"From: News <news@example.test>\r\nTo: a@ok.test\r\nSubject: Offer\r\n"
        b"Message-ID: <m1@example.test>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\npreamble\r\n'
        b'--outer\r\nContent-Type: multipart/alternative; boundary="alt"\r\n\r\n'
        b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        b'Visit https://shop.example.test/a <a href="https://shop.example.test/">x</a>\r\n'
        b"--alt\r\nContent-Type: text/html; charset=" + charset.encode() + b"\r\n"
        b"Content-Transfer-Encoding: " + html_cte.encode() + b"\r\n\r\n" + body.rstrip(b"\r\n") + b"\r\n"
        b"--alt--\r\n"
        b'--outer\r\nContent-Type: text/html; name="page.html"\r\n'
        b'Content-Disposition: attachment; filename="page.html"\r\n\r\n'
        b'<a href="https://attached.example.test/">kept</a>\r\n'
        b"--outer--\r\n"
    )


def _parts(mime: bytes) -> list[EmailMessage]:
    message = email.message_from_bytes(mime, _class=EmailMessage, policy=email.policy.default)
    return [p for p in message.walk() if not p.is_multipart()]


def _track(mime: bytes, options: tracking_pb2.TrackingOptions = BOTH) -> bytes:
    tracker = Tracker(TokenSigner(SECRET))
    return tracker.apply(mime, base=BASE, message_id="m1", account_id="acct1", options=options)


@pytest.mark.parametrize("cte", ["quoted-printable", "base64", "8bit"])
def test_html_links_and_pixel_are_tracked_and_nothing_else_changes(cte: str) -> None:
    original = _message(cte)
    tracked = _track(original)
    before, after = _parts(original), _parts(tracked)
    assert [p.get_content_type() for p in after] == ["text/plain", "text/html", "text/html"]
    # The text part and the attached HTML file are untouched, byte for byte.
    assert after[0].get_payload() == before[0].get_payload()
    assert after[2].get_payload() == before[2].get_payload()
    assert after[1]["Content-Transfer-Encoding"] == cte
    assert after[1].get_content_charset() == "iso-8859-1"
    html = after[1].get_content()
    assert "Bonjour Andr\u00e9" in html  # decoded and re-encoded in its own charset
    assert "https://untracked.example.test/" in html and "mailto:help@example.test" in html
    assert 'href="#top"' in html
    assert "shop.example.test" not in html and "plain.example.test" not in html
    signer = TokenSigner(SECRET)
    found = [(kind, signer.verify(token)) for kind, token in TRACKED.findall(html)]
    links = [
        (token.link, [(t.name, t.value) for t in token.link_tags]) for kind, token in found if kind == "c"
    ]
    assert links == [
        ("https://shop.example.test/a?x=1&y=2", [("campaign", "spring"), ("slot", "top")]),
        ("http://plain.example.test/", []),
    ]
    pixels = [token for kind, token in found if kind == "o"]
    assert len(pixels) == 1 and pixels[0].message_id == "m1" and pixels[0].account_id == "acct1"
    assert html.index("/o/") < html.index("</body>")
    # The same message tracks to the same bytes: a retried delivery sends what the first one sent.
    assert _track(original) == tracked


def test_options_choose_links_pixel_or_nothing() -> None:
    original = _message("quoted-printable")
    assert _track(original, tracking_pb2.TrackingOptions()) == original
    opens_only = _parts(_track(original, tracking_pb2.TrackingOptions(opens=True)))[1].get_content()
    assert "/o/" in opens_only and "/c/" not in opens_only and "https://shop.example.test/a" in opens_only
    clicks_only = _parts(_track(original, tracking_pb2.TrackingOptions(clicks=True)))[1].get_content()
    assert "/o/" not in clicks_only and "/c/" in clicks_only
    text_only = original.replace(b"Content-Type: text/html; charset", b"Content-Type: text/x-other; charset")
    text_only = text_only.replace(b"Content-Type: text/html; name", b"Content-Type: text/x-other; name")
    assert _track(text_only) == text_only


def test_long_links_in_a_7bit_part_switch_it_to_quoted_printable() -> None:
    html = '<a href="https://long.example.test/' + "x" * 900 + '">go</a>'
    tracked = _parts(_track(_message("7bit", "us-ascii", html)))[1]
    assert tracked["Content-Transfer-Encoding"] == "quoted-printable"
    assert "/c/" in tracked.get_content()
    raw = _track(_message("7bit", "us-ascii", html))
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_tokens_are_signed_and_tampering_is_refused() -> None:
    signer = TokenSigner(SECRET)
    token = signer.sign(tracking_pb2.TrackingToken(message_id="m", account_id="a", link="https://x.test/"))
    assert signer.verify(token).link == "https://x.test/"
    payload, mac = token.split(".")
    forged = signer.sign(
        tracking_pb2.TrackingToken(message_id="m", account_id="a", link="https://evil.test/")
    )
    for bad in (
        payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),
        forged.split(".")[0] + "." + mac,
        payload,
        "",
        "!!!.???",
        "\u00e9." + mac,
        "a" * 20000,
    ):
        with pytest.raises(BadToken):
            signer.verify(bad)
    with pytest.raises(BadToken):
        TokenSigner("another secret").verify(token)
    assert tracking_base("", "0.0.0.0:8091") == "http://127.0.0.1:8091"
    assert tracking_base("https://t.example.test/", "x:1", "Links.Brand.test.") == "https://links.brand.test"


_FRAGMENTS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "<body>",
            "</body>",
            "</BODY >",
            "<a href='https://x.test/?a=1&b=\u00e9'>",
            "<a href=https://y.test/>",
            "<a ses:no-track href=http://z.test/>",
            '<a href="http://t.test/" ses:tags="k:v;bad tag:x" />',
            "</a>",
            "<!-- <a href=http://c.test/> -->",
            "<script>var a='<a href=http://s.test/>';</script>",
            "<a href=",
            "<a",
            '"',
            "&amp;",
            "\r\n",
            "\n",
            "<p>\u00e9\u4e2d\U0001f600</p>",
        ]
    ),
)


def _lines(text: str) -> list[str]:
    return re.split(r"\r\n|\r|\n", text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fragments=st.lists(_FRAGMENTS, max_size=30),
    charset=st.sampled_from(["utf-8", "iso-8859-1", "us-ascii", "utf-16"]),
    cte=st.sampled_from(["7bit", "8bit", "quoted-printable", "base64"]),
)
def test_rewriting_any_html_keeps_the_mime_valid(fragments: list[str], charset: str, cte: str) -> None:
    html = "".join(fragments)
    try:
        html.encode(charset)
    except UnicodeError:
        html = html.encode(charset, "replace").decode(charset)
    if charset == "utf-16":  # not ASCII-compatible: only base64 carries it
        cte = "base64"
    if cte == "7bit" and not html.isascii():
        cte = "quoted-printable"
    original = _message(cte, charset, html)
    pixel_only = _track(original, tracking_pb2.TrackingOptions(opens=True))
    tracked = _track(original)
    for mime in (pixel_only, tracked):
        message = email.message_from_bytes(mime, policy=email.policy.default)
        parts = [p for p in message.walk() if not p.is_multipart()]
        assert [p.get_content_type() for p in parts] == ["text/plain", "text/html", "text/html"]
        assert not any(p.defects for p in message.walk())
        assert max(len(line) for line in mime.split(b"\r\n")) <= 998
        assert parts[0].get_payload() == _parts(original)[0].get_payload()
        parts[1].get_content()  # decodes
    # With the pixel alone, the HTML is exactly the original plus the pixel.
    before = _parts(original)[1].get_content()
    after = _parts(pixel_only)[1].get_content()
    pixel = re.search(r'<img src="https://track\.example\.test/o/[^"]+"[^>]*/>', after)
    assert pixel is not None
    # (Line breaks come out as CRLF, as on the wire, where the delivery path has put them already.)
    assert _lines(after[: pixel.start()] + after[pixel.end() :]) == _lines(before)
    # Every tracked link is one this deployment signed.
    signer = TokenSigner(SECRET)
    for _, token in TRACKED.findall(_parts(tracked)[1].get_content()):
        signer.verify(token)


def test_rewrite_html_of_fragments_without_body() -> None:
    out = rewrite_html(
        "<a href=https://x.test/>x</a>", link_url=lambda link, tags: "https://t/c/1", pixel_url="P"
    )
    assert out.startswith('<a href="https://t/c/1">x</a><img src="P"')


# ---- end to end --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_lingering_consumer(nats_url: str) -> Iterator[None]:
    yield
    asyncio.run(forget_delivery_consumer(nats_url))


async def test_delivered_links_and_pixel_become_click_and_open_events(
    start_mesh: MeshFactory, nats_url: str
) -> None:
    port = free_port("127.0.0.2")
    with LoopbackDns() as zone, SmtpServer("127.0.0.2", port) as mx:
        zone.add_mx("ok.test", "mx1.ok.test", 10)
        zone.add_a("mx1.ok.test", "127.0.0.2")
        listen = f"127.0.0.1:{free_port()}"
        mesh = start_mesh(
            delivery_mode="mx",
            delivery_workers=4,
            dns_resolver=zone.address,
            smtp_port=port,
            smtp_helo_name="out.postmesh.test",
            dns_check_poll_seconds=3600,
            dns_timeout_seconds=2,
            tracking_secret=SECRET,
            tracking_http_listen=listen,
        )
        account, key = mesh.create_account()
        with mesh.client(key) as client:
            created = client.identity.CreateEmailIdentity(
                identity_pb2.CreateEmailIdentityRequest(email_identity="example.test")
            )
            for record in created.dns_records:
                zone.add_txt(record.name, record.value)
            client.identity.CheckEmailIdentityVerification(
                identity_pb2.CheckEmailIdentityVerificationRequest(email_identity="example.test")
            )
        queued = queued_message(account, ["reader@ok.test", "other@ok.test"], subject="Offer")
        original = _message("quoted-printable").replace(
            b"<m1@example.test>", f"<{queued.message_id}@example.test>".encode()
        )
        queued.mime = original
        queued.tags.add(name="campaign", value="spring")
        queued.configuration_set_name = "marketing"
        queued.tracking.CopyFrom(BOTH)
        async with EmailEvents(nats_url, account) as events:
            nc = await nats.connect(nats_url)
            await enqueue(nc.jetstream(), queued)
            await nc.close()
            await events.wait_for(
                lambda es: len(events.of(queued.message_id, ev.EMAIL_EVENT_TYPE_DELIVERY)) == 2, within=90
            )
            received = [r for r in mx.received if queued.message_id in r.data.decode("latin-1")]
            assert len(received) == 1  # one transaction, both recipients: one message, one set of URLs
            data = received[0].data
            # Signed after tracking: the delivered message verifies, with dkimpy and with Mail::DKIM.
            assert b"DKIM-Signature:" in data
            assert dkim.DKIM(data).verify(dnsfunc=dkimpy_dns(zone))
            if perl_dkim_available():
                assert perl_dkim_result(data, zone.port) == "pass"
            parts = _parts(data)
            assert parts[0].get_payload() == _parts(original)[0].get_payload()
            html = parts[1].get_content()
            base = f"http://{listen}"
            links = re.findall(re.escape(base) + r"/c/[A-Za-z0-9_.\-]+", html)
            pixels = re.findall(re.escape(base) + r"/o/[A-Za-z0-9_.\-]+", html)
            assert len(links) == 2 and len(pixels) == 1

            agent = "Mozilla/5.0 (postmesh test)"
            async with aiohttp.ClientSession(headers={"User-Agent": agent}) as http:
                # First (so any event it made would come before the others): a HEAD records nothing.
                async with http.head(links[1], allow_redirects=False) as reply:
                    assert reply.status == 302
                async with http.get(links[0], allow_redirects=False) as reply:
                    assert reply.status == 302
                    assert reply.headers["Location"] == "https://shop.example.test/a?x=1&y=2"
                async with http.get(pixels[0]) as reply:
                    assert reply.status == 200 and reply.content_type == "image/gif"
                    assert (await reply.read()).startswith(b"GIF89a")
                payload, mac = links[0].rsplit("/", 1)[1].split(".")
                for bad in (
                    f"{base}/c/{payload}.{mac[::-1]}",
                    f"{base}/c/{payload[:-4]}.{mac}",
                    pixels[0].replace("/o/", "/c/"),
                    links[0].replace("/c/", "/o/"),
                    f"{base}/c/",
                    f"{base}/redirect?url=https://evil.test/",
                ):
                    async with http.get(bad, allow_redirects=False) as reply:
                        assert reply.status == 404, bad
                        assert "Location" not in reply.headers

            await events.wait_for(
                lambda es: bool(
                    events.of(queued.message_id, ev.EMAIL_EVENT_TYPE_CLICK)
                    and events.of(queued.message_id, ev.EMAIL_EVENT_TYPE_OPEN)
                ),
                within=60,
            )
            clicks = events.of(queued.message_id, ev.EMAIL_EVENT_TYPE_CLICK)
            opens = events.of(queued.message_id, ev.EMAIL_EVENT_TYPE_OPEN)
            assert len(clicks) == 1 and len(opens) == 1
            click, open_ = clicks[0], opens[0]
            assert click.click.link == "https://shop.example.test/a?x=1&y=2"
            assert [(t.name, t.value) for t in click.click.link_tags] == [
                ("campaign", "spring"),
                ("slot", "top"),
            ]
            assert click.click.user_agent == agent and open_.open.user_agent == agent
            assert click.click.ip_address == "127.0.0.1" and open_.open.ip_address == "127.0.0.1"
            assert click.click.HasField("timestamp") and open_.open.HasField("timestamp")
            for event in (click, open_):
                mail = event.mail
                assert mail.message_id == queued.message_id and mail.sending_account_id == account
                assert list(mail.destination) == ["reader@ok.test", "other@ok.test"]
                assert [(t.name, t.value) for t in mail.tags] == [("campaign", "spring")]
                assert mail.configuration_set_name == "marketing" and mail.subject == "Offer"
                assert mail.source == queued.from_address


def test_links_are_tracked_as_browsers_read_them() -> None:
    seen: list[str] = []

    def link_url(link: str, tags: object) -> str:
        seen.append(link)
        return "https://t/c/1"

    rewrite_html(
        '<a href=" https://B\u00fccher.test/caf\u00e9?q=a b&amp;x\n=1 ">1</a>'
        '<a href="javascript:alert(1)">2</a><a href="https://">3</a><a href="//x.test/">4</a>',
        link_url=link_url,
        pixel_url=None,
    )
    # One line, ASCII only: a valid Location header; the host as its A-label.
    assert seen == ["https://xn--bcher-kva.test/caf%C3%A9?q=a%20b&x=1"]


_HEADER_VALUES = st.sampled_from(
    [
        "text/html",
        "text/html; charset=x-unknown",
        "text/html; charset=utf-7",
        'multipart/alternative; boundary="b"',
        "multipart/mixed",
        "text/plain",
        "text/html; charset=\u00e9",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content_type=_HEADER_VALUES,
    cte=st.sampled_from(["", "base64", "quoted-printable", "8bit", "binary", "x-uuencode", "BASE64 "]),
    body=st.binary(max_size=300),
    parts=st.lists(st.tuples(_HEADER_VALUES, st.binary(max_size=100)), max_size=3),
)
def test_tracking_never_raises_on_malformed_messages(
    content_type: str, cte: str, body: bytes, parts: list[tuple[str, bytes]]
) -> None:
    head = f"From: a@example.test\r\nContent-Type: {content_type}\r\n".encode()
    if cte:
        head += f"Content-Transfer-Encoding: {cte}\r\n".encode()
    nested = b"".join(
        b"--b\r\nContent-Type: " + kind.encode() + b"\r\n\r\n" + part + b"\r\n" for kind, part in parts
    )
    mime = head + b"\r\n" + body + b"\r\n" + nested + (b"--b--\r\n" if parts else b"")
    out = _track(mime)
    email.message_from_bytes(out, policy=email.policy.default)  # still parses
    assert out.startswith(b"From: a@example.test\r\nContent-Type: ")


async def test_endpoint_behind_a_proxy_and_never_lends_another_accounts_message(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_streams(js)  # run alone, no mesh has made them yet
    mails = TrackedMail(js, retention_days=1)
    owner, other = f"acct{uuid.uuid4().hex[:10]}", f"acct{uuid.uuid4().hex[:10]}"
    message_id = uuid.uuid4().hex
    await mails.remember(ev.Mail(message_id=message_id, sending_account_id=owner, destination=["a@ok.test"]))
    signer = TokenSigner(SECRET)
    recorder = TrackingRecorder(signer=signer, events=EventPublisher(js), mails=mails, clock=SystemClock())
    server = TrackingServer("127.0.0.1:0", recorder, trust_forwarded_for=True)
    port = await server.start()
    # Same message id, another account's token (as if it guessed the id): its event names only the ids.
    token = signer.sign(
        tracking_pb2.TrackingToken(message_id=message_id, account_id=other, link="https://x.test/")
    )
    try:
        async with EmailEvents(nats_url, other) as events, aiohttp.ClientSession() as http:
            headers = {"X-Forwarded-For": "127.0.0.20, 127.0.0.30", "User-Agent": "a" * 5000}
            async with http.get(
                f"http://127.0.0.1:{port}/c/{token}", headers=headers, allow_redirects=False
            ) as reply:
                assert reply.status == 302 and reply.headers["Location"] == "https://x.test/"
            found = await events.wait_for(lambda es: len(es) == 1, within=60)
        click = found[0].email
        assert found[0].account_id == other and click.click.ip_address == "127.0.0.30"
        assert len(click.click.user_agent) == 1024
        assert click.mail == ev.Mail(message_id=message_id, sending_account_id=other)
        assert (await mails.recall(message_id)) is not None and await mails.recall("unknown") is None
    finally:
        await server.stop()
        await nc.close()


def test_open_and_click_render_as_in_aws_examples() -> None:
    """Through the event destinations' one renderer: the whole record's keys, and the open and click
    objects value for value."""

    def example(name: str) -> dict[str, Any]:
        event: dict[str, Any] = json.loads((SES_EXAMPLES / name).read_text())
        return event

    def moment(text: str) -> dt.datetime:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)

    mail = ev.Mail(
        message_id="m1",
        sending_account_id="acct1",
        source="sender@example.com",
        destination=["recipient@example.com"],
        configuration_set_name="ConfigSet",
        subject="Message sent from Amazon SES",
    )
    mail.timestamp.FromDatetime(moment("2017-08-09T21:59:49.927Z"))
    mail.headers.add(name="From", value="sender@example.com")
    mail.headers.add(name="To", value="recipient@example.com")

    expected = example("event-open.json")
    opened = tracking_events.Open(
        ip_address=expected["open"]["ipAddress"], user_agent=expected["open"]["userAgent"]
    )
    opened.timestamp.FromDatetime(moment(expected["open"]["timestamp"]))
    record = event_record(
        new_event("acct1", email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_OPEN, mail=mail, open=opened))
    )
    assert record["eventType"] == "Open" and record["open"] == expected["open"]
    assert set(record) == set(expected) and set(expected["mail"]) <= set(record["mail"])

    expected = example("event-click.json")
    shown = expected["click"]
    clicked = tracking_events.Click(
        ip_address=shown["ipAddress"], user_agent=shown["userAgent"], link=shown["link"]
    )
    clicked.timestamp.FromDatetime(moment(shown["timestamp"]))
    for tag, values in shown["linkTags"].items():
        clicked.link_tags.extend(tracking_events.LinkTag(name=tag, value=v) for v in values)
    record = event_record(
        new_event(
            "acct1", email=ev.EmailEvent(event_type=ev.EMAIL_EVENT_TYPE_CLICK, mail=mail, click=clicked)
        )
    )
    assert record["eventType"] == "Click" and record["click"] == shown
    assert set(record) == set(expected) and set(expected["mail"]) <= set(record["mail"])
