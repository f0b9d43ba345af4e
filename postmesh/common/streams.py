"""Every JetStream stream and event subject postmesh uses, named in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from postmesh.events.v1 import events_pb2

DAY = 24 * 3600


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    retention: RetentionPolicy = RetentionPolicy.LIMITS
    max_age_seconds: float = 14 * DAY
    duplicate_window_seconds: float = 120.0
    description: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def config(self, replicas: int) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            description=self.description,
            subjects=list(self.subjects),
            retention=self.retention,
            storage=StorageType.FILE,
            max_age=self.max_age_seconds,
            duplicate_window=self.duplicate_window_seconds,
            discard=DiscardPolicy.OLD,
            num_replicas=replicas,
        )


EVENTS_SUBJECT_PREFIX = "postmesh.events"
OUTBOUND_SUBJECT_PREFIX = "postmesh.outbound"

# Events every service may publish and read: email events, identity and account changes.
EVENTS = StreamSpec(
    name="POSTMESH_EVENTS",
    subjects=[f"{EVENTS_SUBJECT_PREFIX}.>"],
    description="postmesh events (protobuf postmesh.events.v1.Event)",
)

# Messages accepted by the sender and waiting for a delivery worker: each is taken by one worker.
OUTBOUND = StreamSpec(
    name="POSTMESH_OUTBOUND",
    subjects=[f"{OUTBOUND_SUBJECT_PREFIX}.>"],
    retention=RetentionPolicy.WORK_QUEUE,
    max_age_seconds=7 * DAY,
    description="accepted messages waiting for delivery (work queue)",
)

ACCOUNT_EVENTS_SUBJECT_PREFIX = "postmesh.account-events"

# Each account's email events again, on subjects that name the account, so a durable consumer can
# follow one account's events (the feedback service's SubscribeEvents) without reading everyone's.
ACCOUNT_EVENTS = StreamSpec(
    name="POSTMESH_ACCOUNT_EVENTS",
    subjects=[f"{ACCOUNT_EVENTS_SUBJECT_PREFIX}.>"],
    max_age_seconds=7 * DAY,
    description="email events per account, for SubscribeEvents (protobuf postmesh.events.v1.Event)",
)

ALL_STREAMS = (EVENTS, OUTBOUND, ACCOUNT_EVENTS)

# JetStream object store bucket for message bodies too large to ride inside a queued message.
MESSAGE_STORE_BUCKET = "POSTMESH_MESSAGES"

# JetStream key-value bucket of tracked messages' mail objects, for their open and click events.
TRACKING_BUCKET = "POSTMESH_TRACKING"
# JetStream key-value bucket: message id -> the outbound stream sequence of its first queued copy.
QUEUED_LEDGER_BUCKET = "POSTMESH_QUEUED"


async def open_key_value(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The bucket `config` names, created with `config` when it does not exist yet (one that exists
    keeps its own configuration)."""
    try:
        return await js.key_value(config.bucket)
    except BucketNotFoundError:
        return await js.create_key_value(config)


def outbound_subject(account_id: str) -> str:
    """Where an accepted message waits for delivery: one subject per account, one work queue for all."""
    return f"{OUTBOUND_SUBJECT_PREFIX}.{account_id}"


_EMAIL_EVENT_SUFFIX = {
    events_pb2.EMAIL_EVENT_TYPE_SEND: "send",
    events_pb2.EMAIL_EVENT_TYPE_REJECT: "reject",
    events_pb2.EMAIL_EVENT_TYPE_BOUNCE: "bounce",
    events_pb2.EMAIL_EVENT_TYPE_COMPLAINT: "complaint",
    events_pb2.EMAIL_EVENT_TYPE_DELIVERY: "delivery",
    events_pb2.EMAIL_EVENT_TYPE_DELIVERY_DELAY: "delivery_delay",
    events_pb2.EMAIL_EVENT_TYPE_RENDERING_FAILURE: "rendering_failure",
    events_pb2.EMAIL_EVENT_TYPE_OPEN: "open",
    events_pb2.EMAIL_EVENT_TYPE_CLICK: "click",
    events_pb2.EMAIL_EVENT_TYPE_SUBSCRIPTION: "subscription",
    events_pb2.EMAIL_EVENT_TYPE_HOLD: "hold",
}

EMAIL_EVENTS_SUBJECT = f"{EVENTS_SUBJECT_PREFIX}.email.>"
IDENTITY_CHANGED_SUBJECT = f"{EVENTS_SUBJECT_PREFIX}.identity.changed"
ACCOUNT_CHANGED_SUBJECT = f"{EVENTS_SUBJECT_PREFIX}.account.changed"
API_KEY_REVOKED_SUBJECT = f"{EVENTS_SUBJECT_PREFIX}.apikey.revoked"
CONFIGURATION_SET_CHANGED_SUBJECT = f"{EVENTS_SUBJECT_PREFIX}.configset.changed"
SUPPRESSION_LIST_CHANGED_SUBJECT = f"{EVENTS_SUBJECT_PREFIX}.suppression.changed"


def account_events_subject(account_id: str, event_type: events_pb2.EmailEventType.ValueType) -> str:
    """postmesh.account-events.<account>.bounce, ...: one account's email events."""
    return f"{ACCOUNT_EVENTS_SUBJECT_PREFIX}.{account_id}.{_EMAIL_EVENT_SUFFIX[event_type]}"


def account_events_filter(account_id: str) -> str:
    return f"{ACCOUNT_EVENTS_SUBJECT_PREFIX}.{account_id}.>"


def email_event_subject(event_type: events_pb2.EmailEventType.ValueType) -> str:
    """postmesh.events.email.bounce, ...email.complaint, ...: where email events of a type go."""
    return f"{EVENTS_SUBJECT_PREFIX}.email.{_EMAIL_EVENT_SUFFIX[event_type]}"


def event_subject(event: events_pb2.Event) -> str:
    """The subject an event is published on: postmesh.events.email.bounce, ...identity.changed, ..."""
    kind = event.WhichOneof("payload")
    if kind == "email":
        return email_event_subject(event.email.event_type)
    if kind == "identity_changed":
        return IDENTITY_CHANGED_SUBJECT
    if kind == "account_changed":
        return ACCOUNT_CHANGED_SUBJECT
    if kind == "api_key_revoked":
        return API_KEY_REVOKED_SUBJECT
    if kind == "configuration_set_changed":
        return CONFIGURATION_SET_CHANGED_SUBJECT
    if kind == "suppression_list_changed":
        return SUPPRESSION_LIST_CHANGED_SUBJECT
    raise ValueError(f"event has no payload: {event!r}")
