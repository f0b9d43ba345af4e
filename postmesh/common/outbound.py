"""Putting accepted messages on the outbound work queue, and reading their bodies back.

Both the sender (SendEmail) and identity (verification mail) queue through here, so every message
takes the same path: DKIM signing, retries, bounce and delivery events.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import Header, KeyValueConfig, ObjectStoreConfig, StorageType
from nats.js.errors import APIError, BucketNotFoundError, InvalidKeyError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue, _is_key_valid
from nats.js.object_store import ObjectStore

from postmesh.common import jspublish, tracing
from postmesh.common.streams import (
    DAY,
    MESSAGE_STORE_BUCKET,
    QUEUED_LEDGER_BUCKET,
    open_key_value,
    outbound_subject,
)
from postmesh.sender.v1 import queue_pb2

# A NATS message is at most 1 MiB by default; larger bodies go to the object store.
INLINE_MIME_LIMIT = 512 * 1024


async def message_store(js: JetStreamContext) -> ObjectStore:
    try:
        return await js.object_store(MESSAGE_STORE_BUCKET)
    except BucketNotFoundError:
        return await js.create_object_store(
            MESSAGE_STORE_BUCKET,
            config=ObjectStoreConfig(
                description="bodies of queued messages too large to inline",
                storage=StorageType.FILE,
                ttl=8 * DAY,
            ),
        )


async def queued_ledger(js: JetStreamContext) -> KeyValue:
    return await open_key_value(
        js,
        KeyValueConfig(
            bucket=QUEUED_LEDGER_BUCKET,
            description="the queue copy of each message id that a delivery worker took first",
            storage=StorageType.FILE,
            # Longer than a queued message lives (7 days) plus the request_id retention (1 day).
            ttl=9 * DAY,
        ),
    )


async def first_copy(ledger: KeyValue, message_id: str, stream_sequence: int) -> bool:
    """True unless another copy of this message id (another stream sequence) was taken before.

    A message is queued again under the same id only when a SendEmail retry could not tell whether
    its first try was stored (see docs/reliability.md); after JetStream's duplicate window
    only this ledger still knows. A copy handed out again (a worker died) has the same sequence.
    """
    mine = str(stream_sequence).encode()
    try:
        await _create(ledger, message_id, mine)
        return True
    except KeyWrongLastSequenceError:
        entry = await ledger.get(message_id)
        return entry.value == mine


async def _create(ledger: KeyValue, key: str, value: bytes) -> None:
    """`ledger.create(key, value)`, its usual case (a key never written) through the lean confirmed
    publish: the same subject, header and errors as nats-py's (InvalidKeyError, and
    KeyWrongLastSequenceError once the key has a value). A key that exists goes to nats-py's create
    itself, which also re-creates a deleted key as nats-py does."""
    if not _is_key_valid(key):
        raise InvalidKeyError(key)
    try:
        await jspublish.publish(
            ledger._js, f"{ledger._pre}{key}", value, headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"}
        )
    except APIError as exc:
        # nats-py's KeyValue._update: JSStreamWrongLastSequenceErrF, JSStreamWrongLastSequenceConstantErr
        if exc.err_code not in (10071, 10164):
            raise
        await ledger.create(key, value)


async def enqueue(js: JetStreamContext, message: queue_pb2.QueuedMessage) -> None:
    """Durably queues `message` (returns once JetStream has stored it). De-duplicated by message id."""
    if len(message.mime) > INLINE_MIME_LIMIT:
        store = await message_store(js)
        await store.put(message.message_id, bytes(message.mime))
        message.mime_object = message.message_id
        message.mime = b""
    headers = {"Nats-Msg-Id": _queue_id(message)}
    # The delivery worker's span continues the trace of the call that queued the message.
    tracing.inject(headers)
    await jspublish.publish(
        js, outbound_subject(message.account_id), message.SerializeToString(), headers=headers
    )


def _queue_id(message: queue_pb2.QueuedMessage) -> str:
    # A wait for an unreachable content scanner re-queues without a delivery attempt: its own count.
    scan = f":s{message.scan_attempt}" if message.scan_attempt else ""
    released = ":released" if message.released else ""
    return f"{message.message_id}:{message.attempt}{scan}{released}"


async def load_mime(js: JetStreamContext, message: queue_pb2.QueuedMessage) -> bytes:
    if not message.mime_object:
        return bytes(message.mime)
    store = await message_store(js)
    result = await store.get(message.mime_object)
    return bytes(result.data or b"")


async def forget_mime(js: JetStreamContext, message: queue_pb2.QueuedMessage) -> None:
    """Drops a stored body once the message is finished with (delivered, bounced or expired)."""
    if message.mime_object:
        store = await message_store(js)
        await store.delete(message.mime_object)
