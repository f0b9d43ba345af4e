"""The operator's filtration RPCs of the sender service (held messages, per-account spam policies):
mixed into SenderServicer. Thin: decode, call services.sender.filtration.held, encode."""

from __future__ import annotations

from grpc import aio

from postmesh.common.protoutil import timestamp
from postmesh.sender.v1 import filtration_pb2 as fpb
from postmesh.sender.v1 import queue_pb2
from services.sender.filtration.held import HeldStore, StoredPolicies
from services.sender.models import HeldMessage

_MODES = {
    "off": fpb.SPAM_POLICY_MODE_OFF,
    "tag": fpb.SPAM_POLICY_MODE_TAG,
    "hold": fpb.SPAM_POLICY_MODE_HOLD,
    "reject": fpb.SPAM_POLICY_MODE_REJECT,
}
_NAMES = {value: name for name, value in _MODES.items()}


def _held(row: HeldMessage) -> fpb.HeldMessage:
    queued = queue_pb2.QueuedMessage.FromString(row.queued)
    return fpb.HeldMessage(
        message_id=row.message_id,
        account_id=row.account_id,
        from_address=row.from_address,
        recipients=list(queued.recipients),
        subject=row.subject,
        spam_score=row.spam_score,
        details=row.details,
        held_time=timestamp(row.held_at),
        size_bytes=row.size_bytes,
    )


class FiltrationServicer:
    # Bound in SenderService.on_ready.
    held: HeldStore
    policies: StoredPolicies

    async def ListHeldMessages(
        self, request: fpb.ListHeldMessagesRequest, context: aio.ServicerContext
    ) -> fpb.ListHeldMessagesResponse:
        rows, token = await self.held.list(request.account_id, request.page_size, request.page_token)
        return fpb.ListHeldMessagesResponse(messages=[_held(r) for r in rows], next_page_token=token)

    async def GetHeldMessage(
        self, request: fpb.GetHeldMessageRequest, context: aio.ServicerContext
    ) -> fpb.GetHeldMessageResponse:
        row = await self.held.get(request.message_id)
        raw = queue_pb2.QueuedMessage.FromString(row.queued).mime
        return fpb.GetHeldMessageResponse(message=_held(row), raw_message=raw)

    async def ReleaseHeldMessage(
        self, request: fpb.ReleaseHeldMessageRequest, context: aio.ServicerContext
    ) -> fpb.ReleaseHeldMessageResponse:
        await self.held.release(request.message_id)
        return fpb.ReleaseHeldMessageResponse()

    async def DropHeldMessage(
        self, request: fpb.DropHeldMessageRequest, context: aio.ServicerContext
    ) -> fpb.DropHeldMessageResponse:
        await self.held.drop(request.message_id)
        return fpb.DropHeldMessageResponse()

    async def PutAccountSpamPolicy(
        self, request: fpb.PutAccountSpamPolicyRequest, context: aio.ServicerContext
    ) -> fpb.PutAccountSpamPolicyResponse:
        mode = _NAMES.get(request.policy.mode, "")
        if request.policy.mode and not mode:
            mode = f"mode {request.policy.mode}"  # refused by put() as unknown
        await self.policies.put(request.account_id, mode, request.policy.threshold)
        return fpb.PutAccountSpamPolicyResponse()

    async def GetAccountSpamPolicy(
        self, request: fpb.GetAccountSpamPolicyRequest, context: aio.ServicerContext
    ) -> fpb.GetAccountSpamPolicyResponse:
        own = await self.policies.account_policy(request.account_id)
        policy = own or self.policies.default
        return fpb.GetAccountSpamPolicyResponse(
            policy=fpb.SpamPolicy(mode=_MODES[policy.mode], threshold=policy.threshold),
            account_specific=own is not None,
        )
