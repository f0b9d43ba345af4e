"""A configuration set's own spam policy (PutConfigurationSetFiltrationOptions): SES-style options on
the set, copied onto each message at accept, and judged at delivery by a real rspamd beside the
account's policy, the stricter verdict winning (a set tightens filtering, never loosens it)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmesh.cli.main import main
from postmesh.common.outbound import enqueue
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import configuration_sets_pb2 as cs
from postmesh.sender.v1 import filtration_pb2 as fpb
from postmesh.sender.v1 import queue_pb2
from postmesh.sender.v1 import sender_pb2 as pb
from postmesh.testing_mail import LoopbackDns, SmtpServer
from services.sender.filtration.policy import Action, SpamPolicy, judge_strictest, set_policy
from tests.conftest import MeshFactory
from tests.delivery_helpers import EmailEvents, forget_delivery_consumer, new_account_id, queued_message
from tests.filtration_helpers import Rspamd, receiving_server, spammy_mail
from tests.identity_helpers import create_verified_domain
from tests.sending_helpers import own_nats_server, queued_messages, refusal

REJECT = ev.EMAIL_EVENT_TYPE_REJECT
DELIVERY = ev.EMAIL_EVENT_TYPE_DELIVERY
HOLD = ev.EMAIL_EVENT_TYPE_HOLD


def test_the_strictest_verdict_wins_whoever_gives_it() -> None:
    account = SpamPolicy("tag", 15.0)
    tight = SpamPolicy("reject", 6.0, "configuration set marketing")
    loose = SpamPolicy("off", 15.0, "configuration set transactional")
    assert judge_strictest(10.0, [account, tight]) == (Action.REJECT, tight)
    assert judge_strictest(5.0, [account, tight]) == (Action.PASS, None)
    # A set cannot loosen the account's policy.
    strict_account = SpamPolicy("reject", 8.0)
    assert judge_strictest(9.0, [strict_account, loose]) == (Action.REJECT, strict_account)
    hold = SpamPolicy("hold", 5.0, "configuration set s")
    assert judge_strictest(9.0, [SpamPolicy("reject", 8.5), hold])[0] is Action.REJECT
    assert judge_strictest(7.0, [SpamPolicy("reject", 8.5), hold]) == (Action.HOLD, hold)


def test_a_set_policy_on_the_message_reads_back_with_the_default_threshold() -> None:
    assert set_policy(fpb.SpamPolicy(), "s", 15.0) is None
    got = set_policy(fpb.SpamPolicy(mode=fpb.SPAM_POLICY_MODE_HOLD), "s", 12.0)
    assert got == SpamPolicy("hold", 12.0, "configuration set s")
    assert set_policy(fpb.SpamPolicy(mode=99), "s", 12.0) is None  # type: ignore[arg-type]


@pytest.fixture
def zone() -> Iterator[LoopbackDns]:
    with LoopbackDns() as server:
        yield server


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A NATS server of the test's own: messages queued with no delivery workers stay out of others'."""
    with own_nats_server(tmp_path / "nats") as url:
        yield url


def _send(to: str, configuration_set: str) -> pb.SendEmailRequest:
    return pb.SendEmailRequest(
        from_email_address="a@example.test",
        destination=pb.Destination(to_addresses=[to]),
        configuration_set_name=configuration_set,
        content=pb.EmailContent(
            simple=pb.Message(subject=pb.Content(data="Hi"), body=pb.Body(text=pb.Content(data="Hello")))
        ),
    )


def _policy(mode: int, threshold: float = 0.0) -> fpb.SpamPolicy:
    return fpb.SpamPolicy(mode=mode, threshold=threshold)  # type: ignore[arg-type]


def test_filtration_options_are_set_shown_and_copied_onto_each_message(
    start_mesh: MeshFactory,
    zone: LoopbackDns,
    nats_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mesh = start_mesh(
        sandbox_max_send_rate=1000.0,
        dns_resolver=zone.address,
        dns_check_poll_seconds=3600,
        dns_timeout_seconds=2,
        delivery_workers=0,
    )
    account_id, key = mesh.create_account()
    _, other_key = mesh.create_account()
    with mesh.client(key) as client:
        create_verified_domain(client, zone, "example.test")
        fb = client.feedback
        fb.CreateConfigurationSet(
            cs.CreateConfigurationSetRequest(
                configuration_set_name="marketing",
                filtration_options=cs.FiltrationOptions(spam_policy=_policy(fpb.SPAM_POLICY_MODE_HOLD, 7.5)),
            )
        )
        fb.CreateConfigurationSet(cs.CreateConfigurationSetRequest(configuration_set_name="plain"))

        def shown(name: str) -> cs.ConfigurationSet:
            return fb.GetConfigurationSet(
                cs.GetConfigurationSetRequest(configuration_set_name=name)
            ).configuration_set

        assert shown("marketing").filtration_options.spam_policy == _policy(fpb.SPAM_POLICY_MODE_HOLD, 7.5)
        assert not shown("plain").HasField("filtration_options")

        ids = [client.sender.SendEmail(_send("r@example.test", s)).message_id for s in ("marketing", "plain")]
        queued = {q.message_id: q for q in queued_messages(nats_url, account_id, wait_for=2)}
        assert queued[ids[0]].set_spam_policy == _policy(fpb.SPAM_POLICY_MODE_HOLD, 7.5)
        assert not queued[ids[1]].HasField("set_spam_policy")

        fb.PutConfigurationSetFiltrationOptions(
            cs.PutConfigurationSetFiltrationOptionsRequest(
                configuration_set_name="plain", spam_policy=_policy(fpb.SPAM_POLICY_MODE_REJECT)
            )
        )
        assert shown("plain").filtration_options.spam_policy == _policy(fpb.SPAM_POLICY_MODE_REJECT)
        # The sender's cache of the set is dropped on the change: the next send carries the new policy.
        sent = client.sender.SendEmail(_send("r@example.test", "plain")).message_id
        (again,) = queued_messages(nats_url, account_id, wait_for=1)
        assert again.message_id == sent and again.set_spam_policy.mode == fpb.SPAM_POLICY_MODE_REJECT

        # Mode UNSPECIFIED forgets the set's own policy.
        fb.PutConfigurationSetFiltrationOptions(
            cs.PutConfigurationSetFiltrationOptionsRequest(configuration_set_name="plain")
        )
        assert not shown("plain").HasField("filtration_options")

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            mode=st.integers(min_value=-3, max_value=8),
            threshold=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(-0.5)),
            name=st.sampled_from(["plain", "nope", "", "x" * 80]),
        )
        def hostile(mode: int, threshold: float, name: str) -> None:
            call = lambda: fb.PutConfigurationSetFiltrationOptions(  # noqa: E731
                cs.PutConfigurationSetFiltrationOptionsRequest(
                    configuration_set_name=name, spam_policy=_policy(mode, threshold)
                )
            )
            try:
                call()
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc
                return
            # Accepted: only a known mode with a usable threshold (or no policy at all).
            assert name == "plain" and 0 <= mode <= 4
            assert mode == 0 or (math.isfinite(threshold) and threshold >= 0)

        hostile()
        fb.PutConfigurationSetFiltrationOptions(
            cs.PutConfigurationSetFiltrationOptionsRequest(configuration_set_name="plain")
        )

    # Another account cannot see or change the set.
    with mesh.client(other_key) as stranger:
        code, *_ = refusal(
            lambda: stranger.feedback.PutConfigurationSetFiltrationOptions(
                cs.PutConfigurationSetFiltrationOptionsRequest(
                    configuration_set_name="marketing", spam_policy=_policy(fpb.SPAM_POLICY_MODE_OFF)
                )
            )
        )
        assert code == grpc.StatusCode.NOT_FOUND

    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", key)

    def run(*argv: str) -> str:
        assert main(list(argv)) == 0
        return capsys.readouterr().out

    assert "spam policy:       hold above 7.5" in run("config-set", "show", "marketing")
    assert "filtration options set" in run(
        "config-set", "update", "plain", "--spam-policy", "reject", "--spam-threshold", "9"
    )
    assert "spam policy:       reject above 9" in run("config-set", "show", "plain")
    run("config-set", "update", "plain", "--spam-policy", "none")
    assert "spam policy:       the account's" in run("config-set", "show", "plain")


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    server = Rspamd(tmp_path_factory.mktemp("rspamd")).start()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[tuple[SmtpServer, LoopbackDns]]:
    with receiving_server() as parts:
        yield parts


async def test_rspamd_judges_the_set_policy_beside_the_account_policy(
    start_mesh: MeshFactory, nats_url: str, receiver: tuple[SmtpServer, LoopbackDns], rspamd: Rspamd
) -> None:
    smtp, dns = receiver
    mesh = start_mesh(
        ("sender",),
        delivery_mode="mx",
        delivery_workers=4,
        dns_resolver=dns.address,
        smtp_port=smtp.port,
        rspamd_url=rspamd.url,
        spam_threshold=6.0,
    )
    tagged, strict = new_account_id(), new_account_id()
    with mesh.admin() as admin:
        admin.sender.PutAccountSpamPolicy(
            fpb.PutAccountSpamPolicyRequest(account_id=strict, policy=_policy(fpb.SPAM_POLICY_MODE_REJECT))
        )

    def spam(account: str, set_name: str, policy: fpb.SpamPolicy | None) -> queue_pb2.QueuedMessage:
        message = queued_message(account, ["someone@ok.test"])
        message.mime = spammy_mail(message.message_id)
        message.configuration_set_name = set_name
        if policy is not None:
            message.set_spam_policy.CopyFrom(policy)
        return message

    # Account on the default (tag): its "marketing" set rejects, its "review" set holds, its
    # "relaxed" set (off) changes nothing. The strict account (reject) cannot be loosened by a set.
    rejected = spam(tagged, "marketing", _policy(fpb.SPAM_POLICY_MODE_REJECT))
    held = spam(tagged, "review", _policy(fpb.SPAM_POLICY_MODE_HOLD, 5.0))
    relaxed = spam(tagged, "relaxed", _policy(fpb.SPAM_POLICY_MODE_OFF))
    not_loosened = spam(strict, "relaxed", _policy(fpb.SPAM_POLICY_MODE_OFF))
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        async with EmailEvents(nats_url, tagged) as events, EmailEvents(nats_url, strict) as strict_events:
            for message in (rejected, held, relaxed, not_loosened):
                await enqueue(js, message)
            await events.wait_for(
                lambda es: (
                    bool(events.of(rejected.message_id, REJECT))
                    and bool(events.of(held.message_id, HOLD))
                    and bool(events.of(relaxed.message_id, DELIVERY))
                )
            )
            await strict_events.wait_for(lambda es: bool(strict_events.of(not_loosened.message_id, REJECT)))
            (reject,) = events.of(rejected.message_id, REJECT)
            assert reject.reject.details.endswith("threshold 6 of configuration set marketing")
            (holding,) = events.of(held.message_id, HOLD)
            assert holding.hold.details.endswith("threshold 5 of configuration set review")
            (strict_reject,) = strict_events.of(not_loosened.message_id, REJECT)
            assert "configuration set" not in strict_reject.reject.details
    finally:
        await nc.close()
        await forget_delivery_consumer(nats_url)
    received = [r.message_id for r in smtp.received]
    assert sum(relaxed.message_id in m for m in received) == 1
    for refused in (rejected, held, not_loosened):
        assert not any(refused.message_id in m for m in received)
