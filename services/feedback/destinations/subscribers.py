"""Which accounts follow their events with SubscribeEvents: the router copies only their events onto
the account streams, instead of every account's (two stored copies per message nobody reads).

A subscription marks its account in a key-value bucket before its durable consumer exists, and again
while it is followed. A router never routes with a set read longer than FRESH_SECONDS before (by the
time its request was sent), and a subscription tells its client it exists only `settle_seconds` after
its mark was stored: an event published after that is routed after every router's set was read afresh
after the mark, so it always finds it. Reading the set per batch instead costs a JetStream request per
batch, more than the copies it saves when batches are small. Marks expire a day after the consumers they
stand for would (JetStream removes a subscription nobody opens for its inactive time). Subscriptions
made by releases that did not mark are marked from the stream's consumers at start and every minute
(`mark_existing`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, KeyValueConfig, StorageType
from nats.js.errors import APIError, NoKeysError
from nats.js.kv import KeyValue

from postmesh.common import jspublish
from postmesh.common.streams import ACCOUNT_EVENTS, ACCOUNT_EVENTS_SUBJECT_PREFIX, DAY, open_key_value

log = logging.getLogger(__name__)

BUCKET = "POSTMESH_EVENT_SUBSCRIBERS"
_STREAM = f"KV_{BUCKET}"
# JetStream removes a subscription's consumer nobody opened for this long.
INACTIVE_DAYS = 7.0
# A followed subscription marks its account again this often, well within the marks' lifetime.
REMARK_SECONDS = 3600.0
_REQUEST_SECONDS = 5.0
# How often worker 0 marks the accounts of subscriptions that have no mark.
MARK_EXISTING_SECONDS = 60.0
# A router routes with a set read at most this long before (the request sent), so a subscription
# that waited that long after marking its account is seen by every router. Also the delay of a
# SubscribeEvents stream's opening.
FRESH_SECONDS = 1.0
# For the clocks' rates and the scheduling between a mark's confirmation and the wait.
_SETTLE_MARGIN_SECONDS = 0.25
# Expired marks leave the bucket's last sequence as it was: the kept set is read again this often.
_KEPT_SECONDS = 60.0


class SubscribedAccounts:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        inactive_days: float = INACTIVE_DAYS,
        fresh_seconds: float = FRESH_SECONDS,
    ) -> None:
        self._js = js
        # How long JetStream keeps a subscription nobody opens (Subscriptions reads it from here).
        self.inactive_days = inactive_days
        self._fresh = fresh_seconds
        self._bucket: KeyValue | None = None
        # (last sequence, messages) of the bucket's stream when `_accounts` was read; when the request
        # that read it was sent, and when the keys were last read.
        self._state: tuple[int, int] = (-1, -1)
        self._asked_at = -math.inf
        self._keys_read_at = -math.inf
        self._accounts: frozenset[str] = frozenset()
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def settle_seconds(self) -> float:
        """How long after a mark every router has seen it: a subscription waits this long after
        marking before it tells its client that it exists."""
        return self._fresh + _SETTLE_MARGIN_SECONDS

    async def _kv(self) -> KeyValue:
        if self._bucket is None:
            self._bucket = await open_key_value(
                self._js,
                KeyValueConfig(
                    bucket=BUCKET,
                    description="accounts with SubscribeEvents subscriptions (their events are copied)",
                    storage=StorageType.FILE,
                    # A day longer than the subscriptions the marks stand for.
                    ttl=(self.inactive_days + 1) * DAY,
                ),
            )
        return self._bucket

    async def mark(self, account_id: str) -> None:
        await (await self._kv()).put(account_id, b"")
        # This process's router sees it at once; the others within fresh_seconds.
        self._accounts = self._accounts | {account_id}

    async def current(self) -> frozenset[str]:
        """The subscribed accounts, as the bucket held them at most `fresh_seconds` ago (by the time
        the request that read them was sent). Read again in the background once half that age, so a
        busy router seldom waits; the keys themselves only when a mark was added or expired."""
        while time.monotonic() - self._asked_at > self._fresh:
            await self._refresh()
        if time.monotonic() - self._asked_at > self._fresh / 2:
            self._refresh_soon()
        return self._accounts

    def _refresh_soon(self) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._read())
            self._refreshing.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:
            # The next current() that finds the set too old reads it again, and raises.
            log.debug("reading the event subscribers failed", exc_info=task.exception())

    async def _refresh(self) -> None:
        self._refresh_soon()
        assert self._refreshing is not None
        await asyncio.shield(self._refreshing)

    async def _read(self) -> None:
        asked_at = time.monotonic()
        kv = await self._kv()
        state = await self._bucket_state()
        if state != self._state or asked_at - self._keys_read_at > _KEPT_SECONDS:
            try:
                accounts = frozenset(await kv.keys())
            except NoKeysError:
                accounts = frozenset()
            self._accounts, self._state, self._keys_read_at = accounts, state, asked_at
        self._asked_at = max(self._asked_at, asked_at)

    async def _bucket_state(self) -> tuple[int, int]:
        """The bucket stream's (last sequence, messages): nats-py's stream_info, without building its
        StreamInfo (most of the third of a millisecond of CPU that stream_info took here)."""
        reply = await jspublish.request(
            self._js._nc, f"{self._js._prefix}.STREAM.INFO.{_STREAM}", wait_seconds=_REQUEST_SECONDS
        )
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error is not None:
            raise APIError.from_error(error)
        state = answer["state"]
        return int(state.get("last_seq", 0)), int(state.get("messages", 0))

    async def mark_existing(self) -> int:
        """Marks the account of every subscription consumer on the account stream that has no mark (made
        by an earlier release, or whose mark was lost); returns how many were marked."""
        marked = await self.current()
        prefix = f"{ACCOUNT_EVENTS_SUBJECT_PREFIX}."
        missing: set[str] = set()
        for config in await _consumer_configs(self._js, ACCOUNT_EVENTS.name):
            for subject in [*(config.filter_subjects or []), config.filter_subject or ""]:
                if subject.startswith(prefix):
                    account_id = subject[len(prefix) :].partition(".")[0]
                    if account_id and account_id not in marked:
                        missing.add(account_id)
        for account_id in sorted(missing):
            await self.mark(account_id)
        return len(missing)


async def _consumer_configs(js: JetStreamContext, stream: str) -> list[ConsumerConfig]:
    """Every consumer's configuration: the server lists them a page (256) at a time."""
    configs: list[ConsumerConfig] = []
    while True:
        page = await js.consumers_info(stream, offset=len(configs))
        configs.extend(info.config for info in page)
        if not page:
            return configs
