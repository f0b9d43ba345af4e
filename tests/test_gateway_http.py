"""The gateway's HTTP surface for hostile input: SigV4 as botocore computes it for any path, query and
body; missing, malformed or wrong signatures, bodies that are not JSON or form data, unknown
operations. Always SES's status and error body, never a 500."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit
from xml.etree import ElementTree

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from postmesh.common import sigv4
from postmesh.testing import MeshThread
from services.gateway import v1, v2
from services.gateway.server import Gateway
from tests.gateway_helpers import access_key, running_gateway

SECRET = "s" * 64
KEY_ID = "AKPMTESTTESTTESTTEST"

segments = st.text(min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
query_values = st.text(max_size=12)


def _signed(
    method: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    key: tuple[str, str],
    region: str = "eu-west-1",
) -> AWSRequest:
    request = AWSRequest(method=method, url=url, data=body, headers=headers)
    SigV4Auth(Credentials(*key), "ses", region).add_auth(request)
    return request


@settings(max_examples=100, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.lists(segments, max_size=4),
    query=st.lists(st.tuples(st.text(min_size=1, max_size=8), query_values), max_size=4),
    body=st.binary(max_size=200),
    extra=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
    region=st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=16),
)
def test_the_string_to_sign_is_the_one_botocore_signed(
    method: str, path: list[str], query: list[tuple[str, str]], body: bytes, extra: str, region: str
) -> None:
    raw_path = "/" + "/".join(quote(s, safe="") for s in path)
    # Encoded as botocore's serializers encode (RFC 3986: a space is %20, never "+").
    encoded = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in query)
    url = f"http://127.0.0.1:8025{raw_path}" + (f"?{encoded}" if query else "")
    request = _signed(method, url, body, {"X-Extra": extra}, (KEY_ID, SECRET), region)
    prepared = request.prepare()
    parts = urlsplit(prepared.url)
    headers = [(k, v) for k, v in prepared.headers.items()]
    headers.append(("host", "127.0.0.1:8025"))  # added by the HTTP client on the way
    credential = sigv4.parse_authorization(prepared.headers["Authorization"])
    to_sign = sigv4.string_to_sign(
        method=method,
        raw_path=parts.path,
        raw_query=parts.query,
        headers=headers,
        credential=credential,
        amz_date=prepared.headers["X-Amz-Date"],
        payload_hash=hashlib.sha256(body).hexdigest(),
    )
    expected = sigv4.signature(
        sigv4.key_material(SECRET), credential.date, credential.region, credential.service, to_sign
    )
    assert expected == credential.signature


def _send(
    gateway: Gateway,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    key: tuple[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    url = gateway.url + path
    headers = dict(headers or {})
    if key is not None:
        prepared = _signed(method, url, body, headers, key).prepare()
        headers = dict(prepared.headers.items())
    request = urllib.request.Request(url, data=body or None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def _v1_code(body: bytes) -> str:
    root = ElementTree.fromstring(body)
    namespace = "{http://ses.amazonaws.com/doc/2010-12-01/}"
    assert root.tag == f"{namespace}ErrorResponse"
    return root.findtext(f"{namespace}Error/{namespace}Code") or ""


@pytest.fixture
def gateway_and_key(mesh: MeshThread) -> Iterator[tuple[Gateway, tuple[str, str]]]:
    _, api_key = mesh.create_account()
    key = access_key(mesh, api_key)
    with running_gateway(mesh) as gateway:
        yield gateway, key


def test_missing_malformed_and_wrong_credentials(gateway_and_key: tuple[Gateway, tuple[str, str]]) -> None:
    gateway, key = gateway_and_key
    status, headers, _ = _send(gateway, "GET", "/v2/email/account")
    assert (status, headers["x-amzn-ErrorType"]) == (403, "MissingAuthenticationTokenException")
    status, _, body = _send(gateway, "POST", "/", b"Action=GetSendQuota")
    assert (status, _v1_code(body)) == (403, "MissingAuthenticationToken")
    for authorization in (
        "Basic dXNlcjpwYXNz",
        "AWS4-HMAC-SHA256 Credential=AKPM/20260101/us-east-1/ses/aws4_request",
        "AWS4-HMAC-SHA256 Credential=x, SignedHeaders=host, Signature=zz",
        "AWS4-HMAC-SHA256 Credential=AKPMX/2026/us-east-1/ses/aws4_request, SignedHeaders=host, "
        "Signature=" + "0" * 64,
    ):
        status, headers, _ = _send(
            gateway, "GET", "/v2/email/account", headers={"Authorization": authorization}
        )
        assert (status, headers["x-amzn-ErrorType"]) == (403, "IncompleteSignatureException"), authorization
    status, headers, _ = _send(gateway, "GET", "/v2/email/account", key=(key[0], key[1][::-1]))
    assert (status, headers["x-amzn-ErrorType"]) == (403, "InvalidSignatureException")
    # A body changed after signing.
    url = gateway.url + "/v2/email/list-identities"
    prepared = _signed("POST", url, b"{}", {}, key).prepare()
    tampered = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}
    request = urllib.request.Request(url, data=b'{"PageSize": 1}', headers=tampered)
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(request, timeout=30)
    assert excinfo.value.code == 403
    assert excinfo.value.headers["x-amzn-ErrorType"] == "InvalidSignatureException"


def test_bodies_and_operations_that_are_not_ses(gateway_and_key: tuple[Gateway, tuple[str, str]]) -> None:
    gateway, key = gateway_and_key
    json_type = {"Content-Type": "application/json"}
    for body in (
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe",
        b'{"Content": "text"}',
        b'{"Content": {"Simple": {}}, "Destination": 5}',
    ):
        status, headers, _ = _send(gateway, "POST", "/v2/email/outbound-emails", body, json_type, key)
        assert (status, headers["x-amzn-ErrorType"]) == (400, "SerializationException"), body
    status, headers, _ = _send(gateway, "GET", "/v2/email/no-such-thing", key=key)
    assert (status, headers["x-amzn-ErrorType"]) == (404, "UnknownOperationException")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = _send(gateway, "POST", "/", b"Action=LaunchRockets&Version=2010-12-01", form, key)
    assert (status, _v1_code(body)) == (400, "InvalidAction")
    status, _, body = _send(gateway, "POST", "/", b"\xff\x00 not a form", form, key)
    assert (status, _v1_code(body)) == (400, "MalformedQueryString")
    status, _, body = _send(gateway, "POST", "/", b"Action=SendRawEmail&RawMessage.Data=%%%", form, key)
    assert status == 400


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v2/email/outbound-emails", "/v2/email/identities", "/v2/email/templates", "/"]),
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(lambda value: json.dumps(value).encode()),
    ),
)
def test_no_signed_body_is_answered_with_a_server_error(
    gateway_and_key: tuple[Gateway, tuple[str, str]], path: str, body: bytes
) -> None:
    gateway, key = gateway_and_key
    status, headers, content = _send(gateway, "POST", path, body, {"Content-Type": "application/json"}, key)
    assert status < 500, content
    if status >= 400:
        if path == "/":
            assert _v1_code(content)
        else:
            assert headers["x-amzn-ErrorType"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    authorization=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
    date=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)
def test_no_authorization_header_is_answered_with_a_server_error(
    gateway_and_key: tuple[Gateway, tuple[str, str]], authorization: str, date: str
) -> None:
    gateway, _ = gateway_and_key
    headers = {"Authorization": authorization, "X-Amz-Date": date}
    status, response_headers, _ = _send(gateway, "GET", "/v2/email/account", headers=headers)
    assert status in (403, 400), status
    assert response_headers["x-amzn-ErrorType"]


V1_PARAMETERS = [
    "Source",
    "Destination.ToAddresses.member.1",
    "Destination.CcAddresses.member.2",
    "Message.Subject.Data",
    "Message.Body.Text.Data",
    "Message.Body.Html.Charset",
    "RawMessage.Data",
    "Destinations.member.1",
    "Destinations.member.1.Destination.ToAddresses.member.1",
    "Destinations.member.1.ReplacementTemplateData",
    "Template",
    "TemplateData",
    "DefaultTemplateData",
    "Template.TemplateName",
    "Template.SubjectPart",
    "TemplateName",
    "Tags.member.1.Name",
    "Tags.member.1.Value",
    "EmailAddress",
    "Domain",
    "Identity",
    "Identities.member.1",
    "IdentityType",
    "MaxItems",
    "NextToken",
    "DkimEnabled",
    "MailFromDomain",
    "BehaviorOnMXFailure",
    "NotificationType",
    "SnsTopic",
    "ForwardingEnabled",
    "Enabled",
    "ConfigurationSet.Name",
    "ConfigurationSetName",
    "ConfigurationSetAttributeNames.member.1",
    "EventDestination.Name",
    "EventDestination.Enabled",
    "EventDestination.MatchingEventTypes.member.1",
    "EventDestination.SNSDestination.TopicARN",
    "EventDestination.CloudWatchDestination.DimensionConfigurations.member.1.DimensionName",
    "EventDestinationName",
    "DeliveryOptions.TlsPolicy",
    "TrackingOptions.CustomRedirectDomain",
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    action=st.sampled_from(sorted(v1.ACTIONS)),
    parameters=st.dictionaries(st.sampled_from(V1_PARAMETERS), st.text(max_size=40), max_size=6),
)
# A control character echoed in an error message once made a reply that was not XML.
@example(action="DescribeConfigurationSet", parameters={"ConfigurationSetName": "\x08"})
def test_no_v1_action_is_answered_with_a_server_error(
    gateway_and_key: tuple[Gateway, tuple[str, str]], action: str, parameters: dict[str, str]
) -> None:
    gateway, key = gateway_and_key
    body = urlencode({"Action": action, "Version": "2010-12-01", **parameters}).encode()
    form = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    status, _, content = _send(gateway, "POST", "/", body, form, key)
    assert status < 500, content
    if status >= 400:
        assert _v1_code(content)


# The members of the configuration set, event destination, account and identity operations.
V2_MEMBERS = [
    "ConfigurationSetName",
    "SendingOptions",
    "SendingEnabled",
    "DeliveryOptions",
    "TlsPolicy",
    "MaxDeliverySeconds",
    "ReputationOptions",
    "ReputationMetricsEnabled",
    "SuppressionOptions",
    "SuppressedReasons",
    "TrackingOptions",
    "CustomRedirectDomain",
    "EventDestinationName",
    "EventDestination",
    "Enabled",
    "MatchingEventTypes",
    "SnsDestination",
    "TopicArn",
    "PinpointDestination",
    "EmailForwardingEnabled",
    "PageSize",
    "NextToken",
]
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.text(max_size=20)
    | st.sampled_from(["BOUNCE", "SEND", "REQUIRE", "http://127.0.0.1:9/x", "arn:aws:sns:x"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(V2_MEMBERS), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(
        [(m, t) for m, t, _ in v2.ROUTES if "configuration-set" in t or "/account" in t or "insights" in t]
        + [("PUT", "/v2/email/identities/{EmailIdentity}/feedback")]
    ),
    label=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
    body=st.dictionaries(st.sampled_from(V2_MEMBERS), _JSON_VALUES, max_size=5),
)
def test_no_configuration_set_account_or_insights_request_is_answered_with_a_server_error(
    gateway_and_key: tuple[Gateway, tuple[str, str]], route: tuple[str, str], label: str, body: dict[str, Any]
) -> None:
    gateway, key = gateway_and_key
    method, template = route
    path = re.sub(r"\{\w+\}", quote(label, safe=""), template)
    data = json.dumps(body).encode() if method in ("POST", "PUT") else b""
    status, headers, content = _send(gateway, method, path, data, {"Content-Type": "application/json"}, key)
    assert status < 500, content
    if status >= 400:
        assert headers["x-amzn-ErrorType"]


def test_a_body_over_the_limit_is_refused(mesh: MeshThread) -> None:
    _, api_key = mesh.create_account()
    key = access_key(mesh, api_key)
    with running_gateway(mesh, max_body_bytes=1000) as gateway:
        status, headers, _ = _send(
            gateway, "POST", "/v2/email/outbound-emails", b"{" + b" " * 2000 + b"}", key=key
        )
        assert (status, headers["x-amzn-ErrorType"]) == (413, "BadRequestException")
