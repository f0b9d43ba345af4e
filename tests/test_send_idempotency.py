"""Idempotency keys of the send RPCs, on SQLite and PostgreSQL: replay, reuse, in-flight, takeover."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from postmesh.common import db
from postmesh.common.errors import InvalidArgument, Unavailable
from services.sender.accept import _EVENT_IDS, _event_id
from services.sender.idempotency import CLAIM_LEASE, KEY_RETENTION, IdempotencyKeys
from services.sender.models import Base


class StepClock:
    def __init__(self) -> None:
        self.value = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)

    def now(self) -> dt.datetime:
        return self.value


@pytest.fixture
async def keys(database_url: str) -> AsyncIterator[tuple[IdempotencyKeys, StepClock]]:
    engine = db.create_engine(database_url)
    migrations = Path(__file__).parent.parent / "services" / "sender" / "migrations"
    await db.migrate(engine, migrations, "alembic_version_sender", Base.metadata)
    clock = StepClock()
    yield IdempotencyKeys(db.session_factory(engine), clock), clock
    await engine.dispose()


_counter = itertools.count()


def _new_id() -> str:
    return f"m{next(_counter)}"


async def test_keys_replay_refuse_reuse_and_take_over(keys: tuple[IdempotencyKeys, StepClock]) -> None:
    store, clock = keys
    # No key: fresh ids every time, nothing stored.
    first = await store.claim("acct", "", "", 2, _new_id)
    again = await store.claim("acct", "", "", 2, _new_id)
    assert len(first.message_ids) == 2 and set(first.message_ids).isdisjoint(again.message_ids)

    claim = await store.claim("acct", "key-1", "fp", 1, _new_id)
    assert claim.result is None
    # While the first call runs, a retry is told to come back.
    with pytest.raises(Unavailable) as excinfo:
        await store.claim("acct", "key-1", "fp", 1, _new_id)
    assert excinfo.value.reason == "REQUEST_IN_PROGRESS" and excinfo.value.retry_after_seconds
    await store.finish("acct", claim, {"message_id": claim.message_ids[0]})
    replay = await store.claim("acct", "key-1", "fp", 1, _new_id)
    assert replay.result == {"message_id": claim.message_ids[0]}
    # The same key for another request, or malformed: refused.
    with pytest.raises(InvalidArgument) as reuse:
        await store.claim("acct", "key-1", "other", 1, _new_id)
    assert reuse.value.reason == "IDEMPOTENCY_KEY_REUSED" and reuse.value.field == "request_id"
    for bad in ("x" * 129, "has space", "tab\t"):
        with pytest.raises(InvalidArgument):
            await store.claim("acct", bad, "fp", 1, _new_id)
    # Keys are per account.
    other = await store.claim("other-acct", "key-1", "other", 1, _new_id)
    assert other.result is None

    # A refused call gives its key up: the next call with it starts afresh.
    refused = await store.claim("acct", "key-2", "fp", 1, _new_id)
    await store.abandon("acct", refused)
    fresh = await store.claim("acct", "key-2", "fp", 1, _new_id)
    assert fresh.result is None and fresh.message_ids != refused.message_ids

    # A claim left by a process that died is taken over, with the same message ids.
    clock.value += CLAIM_LEASE + dt.timedelta(seconds=1)
    taken = await store.claim("acct", "key-2", "fp", 1, _new_id)
    assert taken.message_ids == fresh.message_ids and taken.result is None
    with pytest.raises(Unavailable):
        await store.claim("acct", "key-2", "fp", 1, _new_id)

    # After a day, keys are forgotten.
    clock.value += KEY_RETENTION
    assert await store.purge() == 3  # acct key-1, acct key-2, other-acct key-1
    assert (await store.claim("acct", "key-1", "fp", 1, _new_id)).result is None


async def test_a_released_claim_is_taken_over_at_once_with_the_same_ids(
    keys: tuple[IdempotencyKeys, StepClock],
) -> None:
    """A call whose outcome is unknown (the queue did not answer) releases its claim: the retry does
    not wait for the lease and queues the same message ids again; a finished claim is not released."""
    store, _ = keys
    claim = await store.claim("acct", "unknown-outcome", "fp", 3, _new_id)
    await store.release("acct", claim)
    retry = await store.claim("acct", "unknown-outcome", "fp", 3, _new_id)
    assert retry.message_ids == claim.message_ids and retry.result is None
    # The retry holds it now: a third call is told to come back.
    with pytest.raises(Unavailable):
        await store.claim("acct", "unknown-outcome", "fp", 3, _new_id)
    await store.finish("acct", retry, {"ok": True})
    await store.release("acct", retry)
    assert (await store.claim("acct", "unknown-outcome", "fp", 3, _new_id)).result == {"ok": True}


def test_event_ids_are_the_uuid5_of_the_message_and_the_event() -> None:
    """Computed without uuid.UUID, but the same ids as before: an accept retried across an upgrade
    republishes its events under the ids JetStream and the consumers already took."""
    for message_id, what in [
        ("0000019abc0123ab-1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718-000000", "send"),
        ("0000019abc0123ab-1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718-000000", "suppressed:user@example.test"),
        ("x", "suppressed:ünïcode@exämple.test"),
        ("", ""),
    ]:
        assert _event_id(message_id, what) == uuid.uuid5(_EVENT_IDS, f"{message_id}:{what}").hex
