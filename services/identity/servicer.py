"""gRPC surface of the identity service: decode, call the domain, encode."""

from __future__ import annotations

from grpc import aio

from postmesh.common.auth import caller_account_id, current_principal
from postmesh.common.protoutil import timestamp
from postmesh.identity.v1 import identity_pb2 as pb
from postmesh.identity.v1 import identity_pb2_grpc
from services.identity.accesskeys import AccessKeyStore, SignedRequest
from services.identity.accounts import AccountStore
from services.identity.models import AccessKey, Account, ApiKey
from services.identity.servicer_identities import IdentitiesServicer
from services.identity.servicer_smtp import SmtpCredentialsServicer


def account_message(account: Account) -> pb.Account:
    return pb.Account(
        account_id=account.account_id,
        name=account.name,
        status=pb.AccountStatus.Value(f"ACCOUNT_STATUS_{account.status}"),
        create_time=timestamp(account.created_at),
    )


def key_message(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        key_id=key.key_id,
        description=key.description,
        create_time=timestamp(key.created_at),
        revoke_time=timestamp(key.revoked_at),
        revoked=key.revoked_at is not None,
        last_used_time=timestamp(key.last_used_at),
    )


def access_key_message(key: AccessKey) -> pb.AccessKey:
    return pb.AccessKey(
        access_key_id=key.access_key_id,
        description=key.description,
        create_time=timestamp(key.created_at),
        revoked=key.revoked_at is not None,
        revoke_time=timestamp(key.revoked_at),
        last_used_time=timestamp(key.last_used_at),
    )


class IdentityServicer(
    IdentitiesServicer, SmtpCredentialsServicer, identity_pb2_grpc.IdentityServiceServicer
):
    # Bound in IdentityService.on_ready; the interceptor lets no call through before that.
    accounts: AccountStore
    access_keys: AccessKeyStore

    async def CreateAccount(
        self, request: pb.CreateAccountRequest, context: aio.ServicerContext
    ) -> pb.CreateAccountResponse:
        account, new_key = await self.accounts.create_account(request.name)
        return pb.CreateAccountResponse(
            account=account_message(account),
            api_key=key_message(new_key.key),
            api_key_secret=new_key.plaintext,
        )

    async def ListAccounts(
        self, request: pb.ListAccountsRequest, context: aio.ServicerContext
    ) -> pb.ListAccountsResponse:
        accounts, token = await self.accounts.list_accounts(request.page_size, request.page_token)
        return pb.ListAccountsResponse(accounts=[account_message(a) for a in accounts], next_page_token=token)

    async def GetCallerIdentity(
        self, request: pb.GetCallerIdentityRequest, context: aio.ServicerContext
    ) -> pb.GetCallerIdentityResponse:
        account = await self.accounts.get_account(caller_account_id())
        return pb.GetCallerIdentityResponse(
            account=account_message(account), key_id=current_principal().key_id
        )

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: aio.ServicerContext
    ) -> pb.CreateApiKeyResponse:
        new_key = await self.accounts.create_key(caller_account_id(), request.description)
        return pb.CreateApiKeyResponse(api_key=key_message(new_key.key), api_key_secret=new_key.plaintext)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: aio.ServicerContext
    ) -> pb.ListApiKeysResponse:
        keys, token = await self.accounts.list_keys(
            caller_account_id(), request.page_size, request.page_token, request.include_revoked
        )
        return pb.ListApiKeysResponse(api_keys=[key_message(k) for k in keys], next_page_token=token)

    async def RotateApiKey(
        self, request: pb.RotateApiKeyRequest, context: aio.ServicerContext
    ) -> pb.RotateApiKeyResponse:
        new_key, revoked = await self.accounts.rotate_key(caller_account_id(), request.key_id)
        return pb.RotateApiKeyResponse(
            api_key=key_message(new_key.key), api_key_secret=new_key.plaintext, revoked_key_id=revoked
        )

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: aio.ServicerContext
    ) -> pb.RevokeApiKeyResponse:
        key = await self.accounts.revoke_key(caller_account_id(), request.key_id)
        return pb.RevokeApiKeyResponse(api_key=key_message(key))

    async def AuthenticateApiKey(
        self, request: pb.AuthenticateApiKeyRequest, context: aio.ServicerContext
    ) -> pb.AuthenticateApiKeyResponse:
        key = await self.accounts.authenticate(request.api_key)
        return pb.AuthenticateApiKeyResponse(account_id=key.account_id, key_id=key.key_id)

    async def CreateAccessKey(
        self, request: pb.CreateAccessKeyRequest, context: aio.ServicerContext
    ) -> pb.CreateAccessKeyResponse:
        new_key = await self.access_keys.create(caller_account_id(), request.description)
        return pb.CreateAccessKeyResponse(
            access_key=access_key_message(new_key.key), secret_access_key=new_key.secret
        )

    async def ListAccessKeys(
        self, request: pb.ListAccessKeysRequest, context: aio.ServicerContext
    ) -> pb.ListAccessKeysResponse:
        keys, token = await self.access_keys.list(
            caller_account_id(), request.page_size, request.page_token, request.include_revoked
        )
        return pb.ListAccessKeysResponse(
            access_keys=[access_key_message(k) for k in keys], next_page_token=token
        )

    async def RevokeAccessKey(
        self, request: pb.RevokeAccessKeyRequest, context: aio.ServicerContext
    ) -> pb.RevokeAccessKeyResponse:
        key = await self.access_keys.revoke(caller_account_id(), request.access_key_id)
        return pb.RevokeAccessKeyResponse(access_key=access_key_message(key))

    async def VerifyAccessKeySignature(
        self, request: pb.VerifyAccessKeySignatureRequest, context: aio.ServicerContext
    ) -> pb.VerifyAccessKeySignatureResponse:
        key = await self.access_keys.verify(
            SignedRequest(
                access_key_id=request.access_key_id,
                date=request.scope_date,
                region=request.scope_region,
                service=request.scope_service,
                string_to_sign=request.string_to_sign,
                signature=request.signature,
            )
        )
        return pb.VerifyAccessKeySignatureResponse(account_id=key.account_id, access_key_id=key.access_key_id)
