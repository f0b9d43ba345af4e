"""Held messages and per-account spam policies as domain code, on SQLite and PostgreSQL, with a real
JetStream: held once however often a redelivery holds it, paged, released back onto the work queue
under a new de-duplication id, dropped as a Reject event; policies validated."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js.api import ConsumerConfig

from postmesh.common import db
from postmesh.common.bus import EventPublisher, ensure_streams
from postmesh.common.errors import InvalidArgument, NotFound
from postmesh.common.streams import OUTBOUND, outbound_subject
from postmesh.events.v1 import events_pb2 as ev
from postmesh.sender.v1 import queue_pb2
from services.sender.filtration.held import HeldStore, StoredPolicies
from services.sender.filtration.policy import DefaultPolicy, SpamPolicy
from services.sender.models import Base
from tests.delivery_helpers import EmailEvents, forget_delivery_consumer, new_account_id, queued_message
from tests.quota_helpers import ManualClock

MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "sender" / "migrations"
NOW = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)


@pytest.fixture
async def parts(database_url: str, nats_url: str) -> AsyncIterator[tuple[HeldStore, StoredPolicies, str]]:
    engine = db.create_engine(database_url)
    await db.migrate(engine, MIGRATIONS, "alembic_version_sender", Base.metadata)
    sessions = db.session_factory(engine)
    await forget_delivery_consumer(nats_url)  # the work queue allows one consumer per subject
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_streams(js)
    clock = ManualClock(NOW)
    held = HeldStore(sessions=sessions, js=js, events=EventPublisher(js), clock=clock)
    policies = StoredPolicies(sessions, DefaultPolicy(SpamPolicy("tag", 15.0)), clock)
    yield held, policies, nats_url
    await nc.close()
    await engine.dispose()


def _spam(account: str, score: float) -> queue_pb2.QueuedMessage:
    queued = queued_message(account, ["a@ok.test", "b@ok.test"], subject="Cheap")
    queued.filtration.spam_scored = True
    queued.filtration.spam_score = score
    return queued


async def test_hold_list_release_and_drop(parts: tuple[HeldStore, StoredPolicies, str]) -> None:
    held, _, nats_url = parts
    account = new_account_id()
    first, second, third = (_spam(account, s) for s in (9.0, 12.5, 30.0))
    for queued in (first, first, second, third):  # a redelivered message is held once
        await held.hold(queued, bytes(queued.mime), f"spam: score {queued.filtration.spam_score:g}")
    assert await held.count() >= 3

    seen: list[str] = []
    token = ""
    while True:
        page, token = await held.list(account, 2, token)
        assert len(page) <= 2
        seen += [row.message_id for row in page]
        if not token:
            break
    assert sorted(seen) == sorted(m.message_id for m in (first, second, third))
    assert not (await held.list(new_account_id(), 0, ""))[0]  # another account's view is empty
    with pytest.raises(InvalidArgument):
        await held.list(account, 0, "not-a-token")
    row = await held.get(second.message_id)
    assert (row.spam_score, row.subject, row.size_bytes) == (12.5, "Cheap", len(second.mime))

    nc = await nats.connect(nats_url)
    sub = await nc.jetstream().pull_subscribe(
        outbound_subject(account), stream=OUTBOUND.name, config=ConsumerConfig(inactive_threshold=30.0)
    )
    await held.release(first.message_id)
    (msg,) = await sub.fetch(1, timeout=10)
    released = queue_pb2.QueuedMessage.FromString(msg.data)
    await msg.ack()
    await nc.close()
    assert released.message_id == first.message_id and released.released
    assert released.filtration.spam_scored and released.mime == first.mime  # not scored again
    with pytest.raises(NotFound):
        await held.get(first.message_id)
    with pytest.raises(NotFound):
        await held.release(first.message_id)

    async with EmailEvents(nats_url, account) as events:
        await held.drop(third.message_id)
        await events.wait_for(lambda es: bool(events.of(third.message_id, ev.EMAIL_EVENT_TYPE_REJECT)))
    (reject,) = events.of(third.message_id, ev.EMAIL_EVENT_TYPE_REJECT)
    assert reject.reject.reason == "Bad content" and reject.reject.filter == "spam"
    assert reject.reject.details == "spam: score 30; dropped by an operator"
    assert sorted(reject.mail.destination) == ["a@ok.test", "b@ok.test"]
    assert reject.filtration.spam_score == 30.0
    assert [r.message_id for r in (await held.list(account, 0, ""))[0]] == [second.message_id]


async def test_account_policies(parts: tuple[HeldStore, StoredPolicies, str]) -> None:
    _, policies, _ = parts
    account = new_account_id()
    assert await policies.spam_policy(account, "") == SpamPolicy("tag", 15.0)
    await policies.put(account, "hold", 0)  # 0: the default threshold
    assert await policies.spam_policy(account, "any-set") == SpamPolicy("hold", 15.0)
    await policies.put(account, "reject", 7.5)
    assert await policies.account_policy(account) == SpamPolicy("reject", 7.5)
    for threshold in (-1.0, float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InvalidArgument, match="threshold"):
            await policies.put(account, "hold", threshold)
    for mode in ("quarantine", "HOLD", "mode 9"):
        with pytest.raises(InvalidArgument, match="Unknown spam policy"):
            await policies.put(account, mode, 5)
    assert await policies.account_policy(account) == SpamPolicy("reject", 7.5)  # a refusal changes nothing
    with pytest.raises(InvalidArgument):
        await policies.put("", "hold", 5)
    await policies.put(account, "default", 0)
    assert await policies.account_policy(account) is None
