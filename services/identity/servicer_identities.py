"""gRPC surface of email identities: decode, call the domain, encode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from grpc import aio

from postmesh.common.auth import account_for_internal_call, caller_account_id
from postmesh.common.errors import InvalidArgument
from postmesh.common.protoutil import timestamp
from postmesh.identity.v1 import identity_pb2 as pb
from services.identity import dkimkeys
from services.identity.identities import (
    ACTIVE,
    DOMAIN,
    RETIRED,
    SYSTEM_ACCOUNT_ID,
    DkimRequest,
    IdentityStore,
    IdentityView,
    Record,
)


def _status(value: str) -> pb.VerificationStatus.ValueType:
    if not value:
        return pb.VERIFICATION_STATUS_UNSPECIFIED
    return pb.VerificationStatus.Value(f"VERIFICATION_STATUS_{value}")


def _key_length(bits: int) -> pb.DkimSigningKeyLength.ValueType:
    if bits == 1024:
        return pb.DKIM_SIGNING_KEY_LENGTH_RSA_1024_BIT
    if bits == 2048:
        return pb.DKIM_SIGNING_KEY_LENGTH_RSA_2048_BIT
    return pb.DKIM_SIGNING_KEY_LENGTH_UNSPECIFIED


def _bits(length: pb.DkimSigningKeyLength.ValueType) -> int:
    if length == pb.DKIM_SIGNING_KEY_LENGTH_RSA_1024_BIT:
        return 1024
    if length == pb.DKIM_SIGNING_KEY_LENGTH_RSA_2048_BIT:
        return 2048
    return 0


def _mail_from_status(value: str) -> pb.MailFromDomainStatus.ValueType:
    if not value:
        return pb.MAIL_FROM_DOMAIN_STATUS_UNSPECIFIED
    return pb.MailFromDomainStatus.Value(f"MAIL_FROM_DOMAIN_STATUS_{value}")


def _error_type(value: str) -> pb.VerificationError.ValueType:
    if not value:
        return pb.VERIFICATION_ERROR_UNSPECIFIED
    return pb.VerificationError.Value(f"VERIFICATION_ERROR_{value}")


def _records(records: list[Record]) -> list[pb.DnsRecord]:
    return [
        pb.DnsRecord(name=r.name, type=r.type, value=r.value, purpose=r.purpose, found=r.found)
        for r in records
    ]


def _dkim_request(attrs: pb.DkimSigningAttributes) -> DkimRequest:
    return DkimRequest(
        selector=attrs.domain_signing_selector,
        private_key=attrs.domain_signing_private_key,
        rsa_bits=_bits(attrs.next_signing_key_length),
        include_ed25519=attrs.include_ed25519,
    )


def dkim_message(view: IdentityView) -> pb.DkimAttributes:
    row = view.identity
    if row.identity_type != DOMAIN:
        return pb.DkimAttributes(status=pb.VERIFICATION_STATUS_NOT_STARTED)
    live = [k for k in view.keys if k.state != RETIRED]
    active_rsa = [k for k in view.keys if k.state == ACTIVE and k.algorithm == dkimkeys.RSA]
    return pb.DkimAttributes(
        signing_enabled=row.dkim_signing_enabled,
        status=_status(row.dkim_status),
        tokens=[k.selector for k in live],
        signing_attributes_origin=pb.DkimSigningAttributesOrigin.Value(
            f"DKIM_SIGNING_ATTRIBUTES_ORIGIN_{row.dkim_origin}"
        ),
        next_signing_key_length=_key_length(row.dkim_next_key_bits),
        current_signing_key_length=_key_length(active_rsa[0].key_bits if active_rsa else 0),
        last_key_generation_timestamp=timestamp(row.dkim_generated_at),
        keys=[
            pb.DkimKeyInfo(
                selector=k.selector,
                algorithm=k.algorithm,
                key_bits=k.key_bits,
                state=k.state,
                found=k.found,
                create_time=timestamp(k.created_at),
            )
            for k in view.keys
        ],
    )


def identity_message(view: IdentityView) -> pb.GetEmailIdentityResponse:
    row = view.identity
    mail_from = pb.MailFromAttributes(
        mail_from_domain=row.mail_from_domain,
        mail_from_domain_status=_mail_from_status(row.mail_from_status),
        behavior_on_mx_failure=pb.BehaviorOnMxFailure.Value(
            f"BEHAVIOR_ON_MX_FAILURE_{row.mail_from_behavior}"
        ),
    )
    info = pb.VerificationInfo(
        last_checked_timestamp=timestamp(row.last_checked_at),
        last_success_timestamp=timestamp(row.last_success_at),
        error_type=_error_type(row.error_type),
        expire_timestamp=timestamp(view.token_expires_at),
        next_check_timestamp=timestamp(row.next_check_at),
        error_message=row.error_message,
    )
    return pb.GetEmailIdentityResponse(
        identity_type=pb.IdentityType.Value(f"IDENTITY_TYPE_{row.identity_type}"),
        verified_for_sending_status=view.verified_for_sending,
        dkim_attributes=dkim_message(view),
        mail_from_attributes=mail_from,
        policies=view.policies,
        verification_status=_status(view.status),
        verification_info=info,
        email_identity=row.identity,
        dns_records=_records(view.records),
        create_time=timestamp(row.created_at),
        feedback_forwarding_status=view.feedback_forwarding,
        configuration_set_name=row.configuration_set_name,
    )


class IdentitiesServicer:
    """The identity RPCs, mixed into IdentityServicer."""

    identities: IdentityStore
    # Raises NotFound ("Configuration set <name> does not exist.") unless the account has the set.
    check_configuration_set: Callable[[str, str], Awaitable[None]]
    # Raises unless the account's set has a webhook event destination of that name.
    check_webhook_destination: Callable[[str, str, str], Awaitable[None]]

    async def CreateEmailIdentity(
        self, request: pb.CreateEmailIdentityRequest, context: aio.ServicerContext
    ) -> pb.CreateEmailIdentityResponse:
        view = await self.identities.create(
            caller_account_id(), request.email_identity, _dkim_request(request.dkim_signing_attributes)
        )
        return pb.CreateEmailIdentityResponse(
            identity_type=pb.IdentityType.Value(f"IDENTITY_TYPE_{view.identity.identity_type}"),
            verified_for_sending_status=view.verified_for_sending,
            dkim_attributes=dkim_message(view),
            email_identity=view.identity.identity,
            dns_records=_records(view.records),
        )

    async def GetEmailIdentity(
        self, request: pb.GetEmailIdentityRequest, context: aio.ServicerContext
    ) -> pb.GetEmailIdentityResponse:
        return identity_message(await self.identities.get(caller_account_id(), request.email_identity))

    async def ListEmailIdentities(
        self, request: pb.ListEmailIdentitiesRequest, context: aio.ServicerContext
    ) -> pb.ListEmailIdentitiesResponse:
        items, token = await self.identities.list_identities(
            caller_account_id(), request.page_size, request.page_token
        )
        return pb.ListEmailIdentitiesResponse(
            email_identities=[
                pb.IdentityInfo(
                    identity_type=pb.IdentityType.Value(f"IDENTITY_TYPE_{row.identity_type}"),
                    identity_name=row.identity,
                    sending_enabled=verified,
                    verification_status=_status(status),
                )
                for row, status, verified in items
            ],
            next_page_token=token,
        )

    async def DeleteEmailIdentity(
        self, request: pb.DeleteEmailIdentityRequest, context: aio.ServicerContext
    ) -> pb.DeleteEmailIdentityResponse:
        await self.identities.delete(caller_account_id(), request.email_identity)
        return pb.DeleteEmailIdentityResponse()

    async def CheckEmailIdentityVerification(
        self, request: pb.CheckEmailIdentityVerificationRequest, context: aio.ServicerContext
    ) -> pb.CheckEmailIdentityVerificationResponse:
        view = await self.identities.check_now(caller_account_id(), request.email_identity)
        return pb.CheckEmailIdentityVerificationResponse(identity=identity_message(view))

    async def ResendVerificationEmail(
        self, request: pb.ResendVerificationEmailRequest, context: aio.ServicerContext
    ) -> pb.ResendVerificationEmailResponse:
        expires_at = await self.identities.resend(caller_account_id(), request.email_identity)
        return pb.ResendVerificationEmailResponse(expire_time=timestamp(expires_at))

    async def ConfirmEmailIdentity(
        self, request: pb.ConfirmEmailIdentityRequest, context: aio.ServicerContext
    ) -> pb.ConfirmEmailIdentityResponse:
        identity, _ = await self.identities.confirm(request.token)
        return pb.ConfirmEmailIdentityResponse(
            email_identity=identity, verification_status=pb.VERIFICATION_STATUS_SUCCESS
        )

    async def PutEmailIdentityDkimAttributes(
        self, request: pb.PutEmailIdentityDkimAttributesRequest, context: aio.ServicerContext
    ) -> pb.PutEmailIdentityDkimAttributesResponse:
        await self.identities.put_dkim_signing_enabled(
            caller_account_id(), request.email_identity, request.signing_enabled
        )
        return pb.PutEmailIdentityDkimAttributesResponse()

    async def PutEmailIdentityDkimSigningAttributes(
        self, request: pb.PutEmailIdentityDkimSigningAttributesRequest, context: aio.ServicerContext
    ) -> pb.PutEmailIdentityDkimSigningAttributesResponse:
        origin = pb.DkimSigningAttributesOrigin.Name(request.signing_attributes_origin).removeprefix(
            "DKIM_SIGNING_ATTRIBUTES_ORIGIN_"
        )
        view = await self.identities.put_dkim_signing_attributes(
            caller_account_id(), request.email_identity, origin, _dkim_request(request.signing_attributes)
        )
        dkim = dkim_message(view)
        return pb.PutEmailIdentityDkimSigningAttributesResponse(
            dkim_status=dkim.status,
            dkim_tokens=dkim.tokens,
            dns_records=_records([r for r in view.records if r.purpose == "dkim"]),
        )

    async def RotateEmailIdentityDkimKeys(
        self, request: pb.RotateEmailIdentityDkimKeysRequest, context: aio.ServicerContext
    ) -> pb.RotateEmailIdentityDkimKeysResponse:
        view = await self.identities.rotate_dkim(
            caller_account_id(), request.email_identity, _bits(request.next_signing_key_length)
        )
        return pb.RotateEmailIdentityDkimKeysResponse(
            dkim_attributes=dkim_message(view),
            dns_records=_records([r for r in view.records if r.purpose == "dkim"]),
        )

    async def PutEmailIdentityMailFromAttributes(
        self, request: pb.PutEmailIdentityMailFromAttributesRequest, context: aio.ServicerContext
    ) -> pb.PutEmailIdentityMailFromAttributesResponse:
        behavior = (
            pb.BehaviorOnMxFailure.Name(request.behavior_on_mx_failure).removeprefix(
                "BEHAVIOR_ON_MX_FAILURE_"
            )
            if request.behavior_on_mx_failure
            else ""
        )
        view = await self.identities.put_mail_from(
            caller_account_id(), request.email_identity, request.mail_from_domain, behavior
        )
        message = identity_message(view)
        return pb.PutEmailIdentityMailFromAttributesResponse(
            mail_from_attributes=message.mail_from_attributes,
            dns_records=_records([r for r in view.records if r.purpose == "mail-from"]),
        )

    async def PutEmailIdentityFeedbackAttributes(
        self, request: pb.PutEmailIdentityFeedbackAttributesRequest, context: aio.ServicerContext
    ) -> pb.PutEmailIdentityFeedbackAttributesResponse:
        await self.identities.put_feedback_forwarding(
            caller_account_id(), request.email_identity, request.email_forwarding_enabled
        )
        return pb.PutEmailIdentityFeedbackAttributesResponse()

    async def CheckMailFromDomain(
        self, request: pb.CheckMailFromDomainRequest, context: aio.ServicerContext
    ) -> pb.CheckMailFromDomainResponse:
        return pb.CheckMailFromDomainResponse(
            in_use=await self.identities.mail_from_domain_in_use(request.domain)
        )

    async def PutEmailIdentityPolicy(
        self, request: pb.PutEmailIdentityPolicyRequest, context: aio.ServicerContext
    ) -> pb.PutEmailIdentityPolicyResponse:
        await self.identities.put_policy(
            caller_account_id(), request.email_identity, request.policy_name, request.policy
        )
        return pb.PutEmailIdentityPolicyResponse()

    async def GetEmailIdentityPolicies(
        self, request: pb.GetEmailIdentityPoliciesRequest, context: aio.ServicerContext
    ) -> pb.GetEmailIdentityPoliciesResponse:
        found = await self.identities.get_policies(caller_account_id(), request.email_identity)
        return pb.GetEmailIdentityPoliciesResponse(policies=found)

    async def DeleteEmailIdentityPolicy(
        self, request: pb.DeleteEmailIdentityPolicyRequest, context: aio.ServicerContext
    ) -> pb.DeleteEmailIdentityPolicyResponse:
        await self.identities.delete_policy(caller_account_id(), request.email_identity, request.policy_name)
        return pb.DeleteEmailIdentityPolicyResponse()

    async def RewrapDkimKeys(
        self, request: pb.RewrapDkimKeysRequest, context: aio.ServicerContext
    ) -> pb.RewrapDkimKeysResponse:
        master_key_id, rewrapped, current = await self.identities.rewrap_keys()
        return pb.RewrapDkimKeysResponse(
            master_key_id=master_key_id, rewrapped=rewrapped, already_current=current
        )

    async def GetSystemEmailIdentity(
        self, request: pb.GetSystemEmailIdentityRequest, context: aio.ServicerContext
    ) -> pb.GetSystemEmailIdentityResponse:
        view = await self.identities.system_identity()
        return pb.GetSystemEmailIdentityResponse(
            system_account_id=SYSTEM_ACCOUNT_ID,
            system_address=self.identities.config.system_address,
            identity=identity_message(view),
        )

    async def AuthorizeSender(
        self, request: pb.AuthorizeSenderRequest, context: aio.ServicerContext
    ) -> pb.AuthorizeSenderResponse:
        result = await self.identities.authorize_sender(
            account_for_internal_call(request.account_id), request.from_address, request.from_identity
        )
        return pb.AuthorizeSenderResponse(
            identity=result.identity,
            identity_owner_account_id=result.owner_account_id,
            mail_from_domain=result.mail_from_domain,
            feedback_forwarding_enabled=result.feedback_forwarding,
            default_configuration_set_name=result.configuration_set,
        )

    async def SetIdentityNotificationTopic(
        self, request: pb.SetIdentityNotificationTopicRequest, context: aio.ServicerContext
    ) -> pb.SetIdentityNotificationTopicResponse:
        account_id = caller_account_id()
        destination = request.destination.strip()
        if destination:
            set_name, _, name = destination.partition("/")
            if not set_name or not name:
                raise InvalidArgument(
                    "destination must be <configuration set>/<event destination>.", field="destination"
                )
            await self.check_webhook_destination(account_id, set_name, name)
        await self.identities.set_notification_destination(
            account_id, request.identity, _notification_type(request.notification_type), destination
        )
        return pb.SetIdentityNotificationTopicResponse()

    async def SetIdentityHeadersInNotificationsEnabled(
        self, request: pb.SetIdentityHeadersInNotificationsEnabledRequest, context: aio.ServicerContext
    ) -> pb.SetIdentityHeadersInNotificationsEnabledResponse:
        await self.identities.set_headers_in_notifications(
            caller_account_id(),
            request.identity,
            _notification_type(request.notification_type),
            request.enabled,
        )
        return pb.SetIdentityHeadersInNotificationsEnabledResponse()

    async def SetIdentityFeedbackForwardingEnabled(
        self, request: pb.SetIdentityFeedbackForwardingEnabledRequest, context: aio.ServicerContext
    ) -> pb.SetIdentityFeedbackForwardingEnabledResponse:
        await self.identities.set_feedback_forwarding(
            caller_account_id(), request.identity, request.forwarding_enabled
        )
        return pb.SetIdentityFeedbackForwardingEnabledResponse()

    async def GetIdentityNotificationAttributes(
        self, request: pb.GetIdentityNotificationAttributesRequest, context: aio.ServicerContext
    ) -> pb.GetIdentityNotificationAttributesResponse:
        rows = await self.identities.notification_settings(caller_account_id(), list(request.identities))
        return pb.GetIdentityNotificationAttributesResponse(
            notification_attributes={
                row.identity: pb.IdentityNotificationAttributes(
                    bounce_destination=row.bounce_destination,
                    complaint_destination=row.complaint_destination,
                    delivery_destination=row.delivery_destination,
                    forwarding_enabled=self.identities.feedback_forwarding(row),
                    headers_in_bounce_notifications_enabled=row.headers_in_bounce,
                    headers_in_complaint_notifications_enabled=row.headers_in_complaint,
                    headers_in_delivery_notifications_enabled=row.headers_in_delivery,
                )
                for row in rows
            }
        )

    async def PutEmailIdentityConfigurationSetAttributes(
        self, request: pb.PutEmailIdentityConfigurationSetAttributesRequest, context: aio.ServicerContext
    ) -> pb.PutEmailIdentityConfigurationSetAttributesResponse:
        account_id = caller_account_id()
        if request.configuration_set_name:
            await self.check_configuration_set(account_id, request.configuration_set_name)
        await self.identities.put_configuration_set(
            account_id, request.email_identity, request.configuration_set_name
        )
        return pb.PutEmailIdentityConfigurationSetAttributesResponse()

    async def CheckVerifiedRecipients(
        self, request: pb.CheckVerifiedRecipientsRequest, context: aio.ServicerContext
    ) -> pb.CheckVerifiedRecipientsResponse:
        unverified = await self.identities.unverified_recipients(
            account_for_internal_call(request.account_id), list(request.email_addresses)
        )
        return pb.CheckVerifiedRecipientsResponse(unverified=unverified)

    async def GetSigningConfig(
        self, request: pb.GetSigningConfigRequest, context: aio.ServicerContext
    ) -> pb.GetSigningConfigResponse:
        domain, keys = await self.identities.signing_config(
            account_for_internal_call(request.account_id), request.domain
        )
        return pb.GetSigningConfigResponse(
            domain=domain,
            keys=[
                pb.DkimSigningKey(selector=k.selector, algorithm=k.algorithm, private_key_pem=k.private_pem)
                for k in keys
            ],
        )


def _notification_type(value: int) -> str:
    if value == pb.NOTIFICATION_TYPE_UNSPECIFIED:
        return ""
    try:
        return pb.NotificationType.Name(value).removeprefix("NOTIFICATION_TYPE_")  # type: ignore[arg-type]
    except ValueError:
        return str(value)
