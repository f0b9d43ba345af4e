"""Fetching from a JetStream durable pull consumer with little work per message.

nats-py's PullSubscription.fetch spends, for every message, a uuid4, a task, an asyncio.wait_for and
a timer (Subscription.next_msg). A Puller has nats-py hand each message to a callback (one task for
the whole subscription, none per message) that appends it to a buffer; a fetch takes from the buffer,
and when it is empty asks the server with one request:

  `{"batch": n, "no_wait": true, "expires": timeout}`: what there is, at once; when there is nothing,
  the first messages to come, as soon as they come (the server ends the request with a 408 when it
  has delivered what it had, or at expiry).

The server refuses such a request at once ("408 Requests Pending") when other workers' requests
already wait for more messages than there are; then a plain lingering `{"batch": 1, "expires": ...}`
follows. (nats-py falls back to a lingering request for the whole batch there, and waits for all of
it until expiry: a lone message then waits out the timeout.)

One request at most is outstanding, and the server ends each as soon as it has delivered something,
so a worker holds no more than it asked for: what it held unprocessed beyond ack_wait would go to
another worker too. Each request has its own reply subject under the puller's inbox, so a status
answering a request given up on (its connection lost, say) is not taken for the current request's.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, ConnectionDrainingError
from nats.js import JetStreamContext
from nats.js.errors import APIError

# Statuses that end a pull request without an error: no messages (404), expired or ended early by
# no_wait (408), and the conflicts (409: too many waiting requests, consumer deleted, leader changed).
_ENDING = frozenset({"404", "408", "409"})
_HEARTBEAT = "100"
# How long past a lingering request's expiry an answer is waited for: none comes from a server that
# went away with the request.
_GRACE_SECONDS = 0.5
# Less than this left of a fetch's wait is not worth another request; and the shortest expiry asked.
_SHORTEST_EXPIRY = 0.01
# While disconnected a fetch looks this often for the connection to be back.
_RECONNECT_POLL_SECONDS = 0.1


def _nanoseconds(seconds: float) -> int:
    return max(int(seconds * 1e9), int(_SHORTEST_EXPIRY * 1e9))


def _give_up(answer: asyncio.Future[Msg | None]) -> None:
    if not answer.done():
        answer.set_result(None)


class Puller:
    """Fetches from one durable pull consumer; one fetch at a time. Messages are nats-py Msg objects
    (ack, nak, term, in_progress, metadata as usual)."""

    def __init__(self, nc: NATS, next_subject: str, inbox: str) -> None:
        self._nc = nc
        self._next_subject = next_subject
        self._inbox = inbox
        self._sub: Subscription | None = None
        self._buffer: collections.deque[Msg] = collections.deque()
        self._requests = 0
        # The outstanding request: its reply subject, how many messages it may still bring, and the
        # future its end (a status message, or None) is set on.
        self._reply: str | None = None
        self._expected = 0
        self._answer: asyncio.Future[Msg | None] | None = None

    @classmethod
    async def bind(cls, js: JetStreamContext, *, stream: str, durable: str) -> Puller:
        """A puller for the existing durable consumer `durable` on `stream`."""
        # nats-py keeps the connection and the API prefix (which carries a JetStream domain) private;
        # the request subject is the one its own PullSubscription builds.
        nc: NATS = js._nc
        next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        puller = cls(nc, next_subject, nc.new_inbox())
        puller._sub = await nc.subscribe(f"{puller._inbox}.*", cb=puller._receive)
        return puller

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:  # noqa: ASYNC109 - nats-py's signature
        """Up to `batch` messages: those at hand, else those the server has, else the first to come
        within `timeout` seconds; none if none comes. Raises APIError on an unexpected status (503:
        the consumer does not exist)."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if self._sub is None:
            raise ConnectionClosedError
        if not self._buffer:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            if await self._connected(deadline):
                left = deadline - loop.time()
                request = b'{"batch":%d,"no_wait":true,"expires":%d}' % (batch, _nanoseconds(left))
                status = await self._ask(request, batch, deadline + _GRACE_SECONDS)
                left = deadline - loop.time()
                if not self._buffer and status in ("404", "408") and left >= _SHORTEST_EXPIRY:
                    # Refused at once: wait for the next message in line behind the other requests.
                    request = b'{"batch":1,"expires":%d}' % _nanoseconds(left)
                    status = await self._ask(request, 1, deadline + _GRACE_SECONDS)
                if status == "409" and not self._buffer:
                    # Refused (too many waiting requests, a new leader): wait out the time rather
                    # than ask again at once.
                    await asyncio.sleep(max(0.0, deadline - loop.time()))
        return self._take(batch)

    async def unsubscribe(self) -> None:
        """Stops receiving, so a drain does not wait for this subscription. What the buffer held,
        unacked, is sent again after ack_wait."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()

    async def _connected(self, deadline: float) -> bool:
        # A request published while reconnecting would wait in nats-py's buffer and reach the server
        # after the fetch gave up on it: its messages would then sit here unasked for.
        loop = asyncio.get_running_loop()
        while not self._nc.is_connected:
            if self._nc.is_closed:
                raise ConnectionClosedError
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, _RECONNECT_POLL_SECONDS))
        return True

    async def _ask(self, request: bytes, batch: int, until: float) -> str | None:
        """Sends one pull request for `batch` messages and waits until it has been answered in full or
        the loop's clock reaches `until`. Returns the status that ended it, if one did."""
        self._requests += 1
        reply = f"{self._inbox}.{self._requests}"
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Msg | None] = loop.create_future()
        self._reply, self._expected, self._answer = reply, batch, answer
        # A timer rather than asyncio.wait_for/timeout: no task, and a cancellation stays one.
        timer = loop.call_at(until, _give_up, answer)
        try:
            await self._nc.publish(self._next_subject, request, reply=reply)
            ended = await answer
        finally:
            timer.cancel()
            if self._reply == reply:
                # Given up: what it still brings lands in the buffer, its status is ignored.
                self._reply, self._answer = None, None
        if ended is None:
            return None
        status = ended.headers.get("Status") if ended.headers else None
        if status not in _ENDING:
            APIError.from_msg(ended)
        return status

    async def _receive(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._buffer.append(msg)
            if self._reply is not None:
                self._expected -= 1
                if self._expected <= 0:
                    self._end(None)
        elif msg.subject == self._reply and status != _HEARTBEAT:
            self._end(msg)
        # else: the status of a request given up on, or a heartbeat: nothing to do.

    def _end(self, status: Msg | None) -> None:
        answer = self._answer
        self._reply, self._answer = None, None
        if answer is not None and not answer.done():
            answer.set_result(status)

    def _take(self, batch: int) -> list[Msg]:
        buffer = self._buffer
        if len(buffer) <= batch:
            taken = list(buffer)
            buffer.clear()
            return taken
        return [buffer.popleft() for _ in range(batch)]


async def ack_all(messages: Sequence[Msg]) -> None:
    """`await msg.ack()` for each message (nats-py's: fire and forget), written to the connection at
    once: one command buffer instead of a publish (subject checks, a command built, a flush queued)
    per message. While the connection is not up, nats-py's own acks, with their buffering limits."""
    if not messages:
        return
    nc: NATS = messages[0]._client
    if not nc.is_connected or any(m._client is not nc for m in messages):
        for message in messages:
            await message.ack()
        return
    if nc.is_draining_pubs:
        raise ConnectionDrainingError
    for message in messages:
        message._check_reply()  # NotJSMessageError, MsgAlreadyAckdError, as ack() raises them
    # What nats-py's publish(reply) writes: an empty PUB to the message's ack subject.
    await nc._send_command(b"".join(b"PUB %s  0\r\n\r\n" % m.reply.encode() for m in messages))
    nc.stats["out_msgs"] += len(messages)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()
    for message in messages:
        message._ackd = True
