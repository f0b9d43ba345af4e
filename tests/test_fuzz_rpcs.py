"""Every public RPC under generated requests: hostile strings field by field, and invalid UTF-8 put on
the wire where a client library would refuse to. Never INTERNAL, UNKNOWN or a hang; health stays
SERVING. POSTMESH_FUZZ_EXAMPLES sets how many requests per RPC (a few in `make test`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from postmesh.client import Client, error_details
from postmesh.common.auth import Access
from postmesh.common.server import service_class
from postmesh.feedback.v1 import feedback_pb2
from postmesh.identity.v1 import identity_pb2
from postmesh.quota.v1 import quota_pb2
from postmesh.sender.v1 import sender_pb2
from postmesh.testing import MeshThread
from tests.fuzz_helpers import (
    EXAMPLES,
    INVALID_UTF8,
    NEVER,
    fuzz_settings,
    messages,
    raw_call,
    string_paths,
    with_invalid_utf8,
)
from tests.sending_helpers import own_nats_server

_MODULES = {"identity": identity_pb2, "quota": quota_pb2, "sender": sender_pb2, "feedback": feedback_pb2}


def _public_methods() -> list[tuple[str, str, Access]]:
    found: list[tuple[str, str, Access]] = []
    for name, module in _MODULES.items():
        service = service_class(name)
        for descriptor in module.DESCRIPTOR.services_by_name.values():
            for method in descriptor.methods:
                access = service.access.get(method.name, Access.ACCOUNT)
                if access is not Access.INTERNAL:
                    found.append((descriptor.full_name, method.name, access))
    return found


METHODS = _public_methods()


@pytest.fixture(scope="module")
def fuzz_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshThread]:
    directory: Path = tmp_path_factory.mktemp("fuzz-rpcs")
    with own_nats_server(directory / "nats") as url, MeshThread(nats_url=url, data_dir=directory) as mesh:
        yield mesh


def _input_type(service: str, method: str) -> object:
    module = _MODULES[service.split(".")[1]]
    return module.DESCRIPTOR.services_by_name[service.rpartition(".")[2]].methods_by_name[method].input_type


@pytest.mark.parametrize(("service", "method", "access"), METHODS, ids=[f"{m[1]}" for m in METHODS])
def test_public_rpc_never_answers_internal_unknown_or_hangs(
    fuzz_mesh: MeshThread, service: str, method: str, access: Access
) -> None:
    _, key = fuzz_mesh.create_account(f"fuzz {method}")
    client = fuzz_mesh.admin() if access is Access.ADMIN else fuzz_mesh.client(key)
    descriptor = _input_type(service, method)
    paths = string_paths(descriptor)  # type: ignore[arg-type]
    call = raw_call(client.channel, f"/{service}/{method}")
    seen: list[grpc.StatusCode] = []

    @fuzz_settings(max(EXAMPLES // 2, 5))
    @given(
        request=messages(descriptor),  # type: ignore[arg-type]
        corrupt=st.one_of(
            st.none(),
            st.tuples(st.sampled_from(paths or [()]), st.sampled_from(INVALID_UTF8)),
        ),
    )
    def one(request: object, corrupt: tuple[tuple[int, ...], bytes] | None) -> None:
        wire = request.SerializeToString()  # type: ignore[attr-defined]
        if corrupt is not None and corrupt[0]:
            wire = with_invalid_utf8(wire, *corrupt)
        try:
            call(wire, timeout=30)
            seen.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            details = error_details(error)
            assert details.code not in NEVER, (details.code, details.message, wire[:300])
            assert len(details.message) <= 2048, details.message[:200]
            if corrupt is not None and corrupt[0] and details.code is grpc.StatusCode.INVALID_ARGUMENT:
                assert details.reason, details.message
            seen.append(details.code)

    try:
        one()
    finally:
        client.close()
    assert seen
    with Client(fuzz_mesh.address) as probe:
        assert probe.health_status() == "SERVING"


def test_invalid_utf8_in_a_string_field_is_invalid_argument(fuzz_mesh: MeshThread) -> None:
    _, key = fuzz_mesh.create_account()
    with fuzz_mesh.client(key) as client:
        request = sender_pb2.GetEmailTemplateRequest(template_name="ok").SerializeToString()
        call = raw_call(client.channel, "/postmesh.sender.v1.SenderService/GetEmailTemplate")
        with pytest.raises(grpc.RpcError) as excinfo:
            call(with_invalid_utf8(request, (1,), b"bad\xff"), timeout=30)
        details = error_details(excinfo.value)
        assert details.code is grpc.StatusCode.INVALID_ARGUMENT
        assert details.reason == "BAD_REQUEST"
        assert "UTF-8" in details.message


def test_a_request_over_the_size_limit_is_message_rejected_not_resource_exhausted(
    fuzz_mesh: MeshThread,
) -> None:
    _, key = fuzz_mesh.create_account()
    raw = b"From: a@example.test\r\nTo: b@example.test\r\n\r\n" + b"x" * (49 * 1024 * 1024)
    request = sender_pb2.SendEmailRequest(
        content=sender_pb2.EmailContent(raw=sender_pb2.RawMessage(data=raw))
    )
    with fuzz_mesh.client(key) as client, pytest.raises(grpc.RpcError) as excinfo:
        client.sender.SendEmail(request, timeout=120)
    details = error_details(excinfo.value)
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.reason == "MESSAGE_REJECTED"


def test_an_error_about_an_oversized_field_is_short(fuzz_mesh: MeshThread) -> None:
    _, key = fuzz_mesh.create_account()
    huge = "x" * 200_000 + "@example.test"
    with fuzz_mesh.client(key) as client, pytest.raises(grpc.RpcError) as excinfo:
        client.sender.SendEmail(
            sender_pb2.SendEmailRequest(
                from_email_address=huge,
                destination=sender_pb2.Destination(to_addresses=["b@example.test"]),
                content=sender_pb2.EmailContent(
                    simple=sender_pb2.Message(
                        subject=sender_pb2.Content(data="s"),
                        body=sender_pb2.Body(text=sender_pb2.Content(data="t")),
                    )
                ),
            ),
            timeout=60,
        )
    details = error_details(excinfo.value)
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.metadata.get("field") == "from_email_address"
    assert len(details.message) <= 1024
