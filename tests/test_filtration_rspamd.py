"""Spam scoring with a real rspamd: every message's score on its events, and per account the policy
the operator set: tag (record only), hold (kept until released or dropped) or reject above a threshold."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import nats
import pytest

from postmesh.cli.main import main
from postmesh.common.outbound import enqueue
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import filtration_pb2 as fpb
from postmesh.testing import MeshThread
from postmesh.testing_mail import LoopbackDns, SmtpServer
from tests.conftest import MeshFactory
from tests.delivery_helpers import EmailEvents, forget_delivery_consumer, new_account_id, queued_message
from tests.filtration_helpers import Rspamd, receiving_server, spammy_mail

DELIVERY = ev.EMAIL_EVENT_TYPE_DELIVERY
REJECT = ev.EMAIL_EVENT_TYPE_REJECT
HOLD = ev.EMAIL_EVENT_TYPE_HOLD


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rspamd]:
    server = Rspamd(tmp_path_factory.mktemp("rspamd")).start()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[tuple[SmtpServer, LoopbackDns]]:
    with receiving_server() as parts:
        yield parts


@pytest.fixture(autouse=True)
def _no_lingering_consumer(nats_url: str) -> Iterator[None]:
    yield
    asyncio.run(forget_delivery_consumer(nats_url))


def _mesh(
    start_mesh: MeshFactory, smtp: SmtpServer, dns: LoopbackDns, rspamd: Rspamd, **extra: object
) -> MeshThread:
    """A sender that delivers to `smtp` and scores every message with `rspamd`."""
    return start_mesh(
        ("sender",),
        delivery_mode="mx",
        delivery_workers=4,
        dns_resolver=dns.address,
        smtp_port=smtp.port,
        rspamd_url=rspamd.url,
        **extra,
    )


def _policy(mesh: MeshThread, account: str, mode: int, threshold: float = 0.0) -> None:
    with mesh.admin() as admin:
        admin.sender.PutAccountSpamPolicy(
            fpb.PutAccountSpamPolicyRequest(
                account_id=account,
                policy=fpb.SpamPolicy(mode=mode, threshold=threshold),  # type: ignore[arg-type]
            )
        )


async def test_scores_are_recorded_and_policies_tag_hold_or_reject(
    start_mesh: MeshFactory, nats_url: str, receiver: tuple[SmtpServer, LoopbackDns], rspamd: Rspamd
) -> None:
    smtp, dns = receiver
    mesh = _mesh(start_mesh, smtp, dns, rspamd, spam_threshold=6.0)
    tagged, held, rejected = new_account_id(), new_account_id(), new_account_id()
    _policy(mesh, held, fpb.SPAM_POLICY_MODE_HOLD)
    _policy(mesh, rejected, fpb.SPAM_POLICY_MODE_REJECT, threshold=6.5)
    with mesh.admin() as admin:
        shown = admin.sender.GetAccountSpamPolicy(fpb.GetAccountSpamPolicyRequest(account_id=rejected))
        assert shown.account_specific and shown.policy.mode == fpb.SPAM_POLICY_MODE_REJECT
        assert shown.policy.threshold == 6.5
        default = admin.sender.GetAccountSpamPolicy(fpb.GetAccountSpamPolicyRequest(account_id=tagged))
        assert not default.account_specific and default.policy.mode == fpb.SPAM_POLICY_MODE_TAG
        with pytest.raises(grpc.RpcError) as refused:
            admin.sender.PutAccountSpamPolicy(
                fpb.PutAccountSpamPolicyRequest(account_id=tagged, policy=fpb.SpamPolicy(threshold=-1))
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # An account's own key cannot reach the operator's RPCs.
    with mesh.client("pm_nokey_nosecret") as stranger, pytest.raises(grpc.RpcError):
        stranger.sender.ListHeldMessages(fpb.ListHeldMessagesRequest())

    messages = {}
    for account in (tagged, held, rejected):
        clean = queued_message(account, ["someone@ok.test"])
        spam = queued_message(account, ["someone@ok.test"])
        spam.mime = spammy_mail(spam.message_id)
        messages[account] = (clean, spam)
    second_held = queued_message(held, ["other@ok.test"])
    second_held.mime = spammy_mail(second_held.message_id)

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    async with EmailEvents(nats_url, tagged) as tag_events, EmailEvents(nats_url, held) as held_events:
        async with EmailEvents(nats_url, rejected) as reject_events:
            for clean, spam in messages.values():
                await enqueue(js, clean)
                await enqueue(js, spam)
            await enqueue(js, second_held)
            clean, spam = messages[rejected]
            await reject_events.wait_for(
                lambda es: (
                    bool(reject_events.of(spam.message_id, REJECT))
                    and bool(reject_events.of(clean.message_id, DELIVERY))
                )
            )
        (reject,) = reject_events.of(spam.message_id, REJECT)
        assert reject.reject.reason == "Bad content" and reject.reject.filter == "spam"
        assert reject.reject.details.startswith("spam: score ") and "threshold 6.5" in reject.reject.details
        assert reject.filtration.spam_scored and reject.filtration.spam_score > 6.5

        clean, spam = messages[tagged]
        await tag_events.wait_for(
            lambda es: all(tag_events.of(m.message_id, DELIVERY) for m in (clean, spam))
        )
        clean_score = tag_events.of(clean.message_id, DELIVERY)[0].filtration
        spam_score = tag_events.of(spam.message_id, DELIVERY)[0].filtration
        assert clean_score.spam_scored and spam_score.spam_scored
        assert spam_score.spam_score > 6.0 > clean_score.spam_score
        assert spam_score.spam_action  # rspamd's own verdict, recorded

        clean, spam = messages[held]
        await held_events.wait_for(lambda es: bool(held_events.of(clean.message_id, DELIVERY)))

        def held_ids() -> set[str]:
            with mesh.admin() as admin:
                listed = admin.sender.ListHeldMessages(fpb.ListHeldMessagesRequest(account_id=held))
            return {m.message_id for m in listed.messages}

        deadline = asyncio.get_running_loop().time() + 60
        while held_ids() != {spam.message_id, second_held.message_id}:
            assert asyncio.get_running_loop().time() < deadline, held_ids()
            await asyncio.sleep(0.2)
        await held_events.wait_for(
            lambda es: all(held_events.of(m.message_id, HOLD) for m in (spam, second_held))
        )
        # Held: a Hold event saying why, and nothing else yet (nothing sent).
        (holding,) = held_events.of(spam.message_id)
        assert holding.event_type == HOLD and holding.hold.action == ev.HOLD_ACTION_HELD
        assert holding.hold.details.startswith("spam: score ") and holding.filtration.spam_score > 6.0
        with mesh.admin() as admin:
            shown_held = admin.sender.GetHeldMessage(fpb.GetHeldMessageRequest(message_id=spam.message_id))
            assert b"VIAGRA" in shown_held.raw_message
            assert shown_held.message.spam_score > 6.0 and shown_held.message.recipients == [
                "someone@ok.test"
            ]
            admin.sender.ReleaseHeldMessage(fpb.ReleaseHeldMessageRequest(message_id=spam.message_id))
            admin.sender.DropHeldMessage(fpb.DropHeldMessageRequest(message_id=second_held.message_id))
            with pytest.raises(grpc.RpcError) as gone:
                admin.sender.GetHeldMessage(fpb.GetHeldMessageRequest(message_id=spam.message_id))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        await held_events.wait_for(
            lambda es: (
                bool(held_events.of(spam.message_id, DELIVERY))
                and bool(held_events.of(second_held.message_id, REJECT))
            )
        )
        (dropped,) = held_events.of(second_held.message_id, REJECT)
        assert "dropped by an operator" in dropped.reject.details
        await held_events.wait_for(
            lambda es: (
                len(held_events.of(spam.message_id, HOLD)) == 2
                and len(held_events.of(second_held.message_id, HOLD)) == 2
            )
        )
        assert [e.hold.action for e in held_events.of(spam.message_id, HOLD)] == [
            ev.HOLD_ACTION_HELD,
            ev.HOLD_ACTION_RELEASED,
        ]
        assert [e.hold.action for e in held_events.of(second_held.message_id, HOLD)] == [
            ev.HOLD_ACTION_HELD,
            ev.HOLD_ACTION_DROPPED,
        ]
        assert held_ids() == set()
    await nc.close()
    received = [r.message_id for r in smtp.received]
    assert sum(spam.message_id in m for m in received) == 1  # released: sent once
    assert not any(second_held.message_id in m for m in received)
    assert not any(messages[rejected][1].message_id in m for m in received)


async def test_operator_cli_sets_policies_and_handles_held_mail(
    start_mesh: MeshFactory,
    nats_url: str,
    receiver: tuple[SmtpServer, LoopbackDns],
    rspamd: Rspamd,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    smtp, dns = receiver
    mesh = _mesh(start_mesh, smtp, dns, rspamd)
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_ADMIN_KEY", mesh.admin_key)

    def run(*argv: str) -> str:
        assert main(list(argv)) == 0
        return capsys.readouterr().out

    account = new_account_id()
    assert "tag above 15 (the default)" in run("admin", "spam-policy", account)
    out = run("admin", "spam-policy", account, "--mode", "hold", "--threshold", "6")
    assert "hold above 6 (the account's own)" in out
    spam = queued_message(account, ["someone@ok.test"])
    spam.mime = spammy_mail(spam.message_id)
    nc = await nats.connect(nats_url)
    await enqueue(nc.jetstream(), spam)
    await nc.close()
    deadline = asyncio.get_running_loop().time() + 60
    while spam.message_id not in (listed := run("admin", "held", "list", "--account", account)):
        assert asyncio.get_running_loop().time() < deadline, (listed, [r.message_id for r in smtp.received])
        await asyncio.sleep(0.3)
    assert "1 held message(s)" in listed
    shown = run("admin", "held", "show", spam.message_id)
    assert "spam: score" in shown and "someone@ok.test" in shown
    assert "VIAGRA" in run("admin", "held", "show", spam.message_id, "--raw")
    async with EmailEvents(nats_url, account) as events:
        assert "dropped" in run("admin", "held", "drop", spam.message_id)
        await events.wait_for(lambda es: bool(events.of(spam.message_id, REJECT)))
    assert "0 held message(s)" in run("admin", "held", "list", "--account", account)
    assert "the default" in run("admin", "spam-policy", account, "--mode", "default")
