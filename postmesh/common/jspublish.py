"""Confirmed JetStream publishes and synchronous acks at less CPU per message than nats-py's.

nats-py (2.16) sends both through `Client.request`, which per call reads os.urandom (secrets.token_hex),
decodes the token twice, adds a done-callback and waits with asyncio.wait_for (a task on Python 3.11).
Here each connection gets one wildcard reply subscription (`<inbox>.*`); a request's reply subject ends
in a counter, its future waits in a dict under that subject, and a timer (eventloop.time_out_after)
bounds the wait.

What callers see is nats-py's: the same PubAck, the same exceptions (nats.errors.TimeoutError when no
reply comes, NoStreamResponseError when no stream takes the subject, APIError.from_error for a stream's
refusal), and Nats-Msg-Id de-duplication reported by PubAck.duplicate. One difference: a request still
waiting when the connection is closed fails at once with ConnectionClosedError instead of timing out.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import weakref
from collections.abc import Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import Header, PubAck

from postmesh.common import eventloop

# What nats-py's JetStreamContext waits for a PubAck unless told otherwise.
_DEFAULT_JS_TIMEOUT = 5.0
# The status of the server's reply when nothing subscribes to the subject (nats-py's constant).
_NO_RESPONDERS_STATUS = "503"


class _Replies:
    """The reply subscription of one connection and the requests waiting on it."""

    def __init__(self, nc: NATS) -> None:
        # No reference to the connection (it keys a WeakKeyDictionary whose values must not hold it).
        self._prefix = nc.new_inbox() + "."
        self._tokens = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._subscribed = False
        self._lock = asyncio.Lock()

    async def request(
        self, nc: NATS, subject: str, payload: bytes, headers: dict[str, str] | None, wait_seconds: float
    ) -> Msg:
        if not self._subscribed:
            await self._subscribe(nc)
        reply, future = self._expect(asyncio.get_running_loop())
        try:
            await nc.publish(subject, payload, reply=reply, headers=headers)
            timer = eventloop.time_out_after(wait_seconds, future)
            try:
                msg = await future
            except TimeoutError:
                raise nats.errors.TimeoutError from None
            finally:
                timer.cancel()
        finally:
            self._waiting.pop(reply, None)
        if msg.headers and msg.headers.get(Header.STATUS) == _NO_RESPONDERS_STATUS:
            raise nats.errors.NoRespondersError
        return msg

    async def request_many(
        self,
        nc: NATS,
        requests: Sequence[tuple[str, bytes, dict[str, str] | None]],
        wait_seconds: float,
    ) -> list[Msg | Exception]:
        """The requests written in order, then their replies waited for together (one wait, one
        timer, no task per request): each request's reply, or what its `request` would have raised."""
        if not self._subscribed:
            await self._subscribe(nc)
        loop = asyncio.get_running_loop()
        replies: list[str] = []
        answers: list[asyncio.Future[Msg] | Exception] = []
        try:
            for subject, payload, headers in requests:
                reply, future = self._expect(loop)
                replies.append(reply)
                try:
                    await nc.publish(subject, payload, reply=reply, headers=headers)
                except Exception as exc:
                    answers.append(exc)
                    continue
                answers.append(future)
            waiting = [a for a in answers if isinstance(a, asyncio.Future) and not a.done()]
            if waiting:
                await asyncio.wait(waiting, timeout=wait_seconds)
        finally:
            for reply in replies:
                self._waiting.pop(reply, None)
        return [_reply_of(answer) for answer in answers]

    def _expect(self, loop: asyncio.AbstractEventLoop) -> tuple[str, asyncio.Future[Msg]]:
        """A new reply subject and the future its reply will be set on. A counter, never reused: a
        late reply to a request that timed out finds no future."""
        reply = self._prefix + str(next(self._tokens))
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[reply] = future
        return reply, future

    async def _subscribe(self, nc: NATS) -> None:
        async with self._lock:
            if self._subscribed:
                return
            subscription = await nc.subscribe(self._prefix + "*", cb=self._on_reply)
            self._subscribed = True
            # nats-py replays the subscription after a reconnect, and cancels its task when the
            # connection closes (or the subscription is drained): then nothing can answer.
            task = subscription._wait_for_msgs_task
            if task is not None:
                task.add_done_callback(lambda _: self._closed())

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject, None)
        if future is not None and not future.done():
            future.set_result(msg)

    def _closed(self) -> None:
        self._subscribed = False
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())


def _reply_of(answer: asyncio.Future[Msg] | Exception) -> Msg | Exception:
    if isinstance(answer, Exception):
        return answer
    if not answer.done():
        return nats.errors.TimeoutError()
    failure = answer.exception()
    if failure is not None:
        return failure if isinstance(failure, Exception) else nats.errors.ConnectionClosedError()
    msg = answer.result()
    if msg.headers and msg.headers.get(Header.STATUS) == _NO_RESPONDERS_STATUS:
        return nats.errors.NoRespondersError()
    return msg


_replies: weakref.WeakKeyDictionary[NATS, _Replies] = weakref.WeakKeyDictionary()


def _replies_of(nc: NATS) -> _Replies:
    replies = _replies.get(nc)
    if replies is None:
        replies = _replies[nc] = _Replies(nc)
    return replies


async def request(
    nc: NATS,
    subject: str,
    payload: bytes = b"",
    *,
    wait_seconds: float,
    headers: dict[str, str] | None = None,
) -> Msg:
    """nats-py's `Client.request` (new style): the reply, NoRespondersError on a 503 status,
    nats.errors.TimeoutError when none comes within `wait_seconds`."""
    return await _replies_of(nc).request(nc, subject, payload, headers, wait_seconds)


async def publish(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    *,
    headers: dict[str, str] | None = None,
    wait_seconds: float | None = None,
) -> PubAck:
    """`js.publish(subject, payload, headers=headers)`: returns once the stream has stored the message.

    Like nats-py's publish, this goes to `subject` itself (a JetStream API prefix or domain applies
    only to $JS.API requests, not to publishes). `wait_seconds` defaults to the context's own.
    """
    nc: NATS = js._nc
    if wait_seconds is None:
        wait_seconds = getattr(js, "_timeout", _DEFAULT_JS_TIMEOUT)
    try:
        msg = await _replies_of(nc).request(nc, subject, payload, headers, wait_seconds)
    except nats.errors.NoRespondersError:
        raise nats.js.errors.NoStreamResponseError from None
    return _pub_ack(msg)


async def publish_many(
    js: JetStreamContext,
    messages: Sequence[tuple[str, bytes, dict[str, str] | None]],
    *,
    wait_seconds: float | None = None,
) -> list[PubAck | Exception]:
    """`publish` of each (subject, payload, headers), all in flight at once and written in order: for
    each, its PubAck or the exception its `publish` would have raised. A batch costs one wait instead
    of a task and a timer per message (what asyncio.gather over `publish` costs)."""
    return [_outcome(reply) for reply in await _requests(js, messages, wait_seconds)]


async def publish_all(
    js: JetStreamContext,
    messages: Sequence[tuple[str, bytes, dict[str, str] | None]],
    *,
    wait_seconds: float | None = None,
) -> None:
    """`publish_many` for a caller that needs no PubAck: returns once every message is stored, else
    raises the first failure once all are answered. A stored message's reply is recognized without
    being parsed (the server's PubAck JSON starts with its stream and names no error)."""
    for reply in await _requests(js, messages, wait_seconds):
        if isinstance(reply, Msg) and reply.data.startswith(b'{"stream":') and b'"error"' not in reply.data:
            continue
        outcome = _outcome(reply)
        if isinstance(outcome, Exception):
            raise outcome


async def _requests(
    js: JetStreamContext,
    messages: Sequence[tuple[str, bytes, dict[str, str] | None]],
    wait_seconds: float | None,
) -> list[Msg | Exception]:
    nc: NATS = js._nc
    if wait_seconds is None:
        wait_seconds = getattr(js, "_timeout", _DEFAULT_JS_TIMEOUT)
    return await _replies_of(nc).request_many(nc, messages, wait_seconds)


def _outcome(reply: Msg | Exception) -> PubAck | Exception:
    """What `publish` would return or raise for this reply."""
    if isinstance(reply, nats.errors.NoRespondersError):
        return nats.js.errors.NoStreamResponseError()
    if isinstance(reply, Exception):
        return reply
    try:
        return _pub_ack(reply)
    except Exception as exc:
        return exc


def _pub_ack(msg: Msg) -> PubAck:
    response = json.loads(msg.data)
    if "error" in response:
        raise nats.js.errors.APIError.from_error(response["error"])
    return PubAck.from_response(response)


async def ack_sync(msg: Msg, wait_seconds: float = 1.0) -> Msg:
    """`msg.ack_sync(timeout=wait_seconds)`: acks a JetStream message, waits for the server to confirm."""
    msg._check_reply()  # NotJSMessageError, MsgAlreadyAckdError, as nats-py raises them
    response = await request(msg._client, msg.reply, wait_seconds=wait_seconds)
    msg._ackd = True
    return response
