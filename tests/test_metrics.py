"""The metrics operators alert on, scraped from a real `postmesh serve all` process, and the Grafana
dashboard in deploy/grafana referring only to metrics that exist."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from postmesh.client import Client
from postmesh.common import metrics
from postmesh.identity.v1 import identity_pb2
from postmesh.sender.v1 import sender_pb2

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "postmesh-dashboard.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_for(port: int, name: str, **labels: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        text = _scrape(port)
        if _sample(text, name, **labels) > 0:
            return text
        assert time.monotonic() < deadline, f"{name}{labels} never counted:\n{text}"
        time.sleep(0.5)


@pytest.mark.parametrize("serve_process", [{"DELIVERY_WORKERS": "2", "DELIVERY_MODE": "sink"}], indirect=True)
def test_operator_metrics_are_exported_and_move(serve_process) -> None:  # type: ignore[no-untyped-def]
    _, address, metrics_port, _ = serve_process
    with Client(address, "admin-secret") as admin:
        account = admin.identity.CreateAccount(identity_pb2.CreateAccountRequest(name="metrics"), timeout=10)
    with Client(address, account.api_key_secret) as client:
        # The verification message goes through the delivery workers (sink mode): one delivery.
        client.identity.CreateEmailIdentity(
            identity_pb2.CreateEmailIdentityRequest(email_identity="ops@example.test"), timeout=10
        )
        # An unverified sender is refused: a refusal counted with its reason.
        with pytest.raises(grpc.RpcError):
            client.sender.SendEmail(
                sender_pb2.SendEmailRequest(
                    from_email_address="nobody@unverified.test",
                    destination=sender_pb2.Destination(to_addresses=["a@example.test"]),
                    content=sender_pb2.EmailContent(
                        simple=sender_pb2.Message(
                            subject=sender_pb2.Content(data="hi"),
                            body=sender_pb2.Body(text=sender_pb2.Content(data="hello")),
                        )
                    ),
                ),
                timeout=10,
            )
    _wait_for(metrics_port, "postmesh_delivery_outcomes_total", result="delivered")
    text = _wait_for(metrics_port, "postmesh_stream_messages", stream="POSTMESH_EVENTS")
    assert _sample(text, "postmesh_refusals_total", method="/postmesh.sender.v1.SenderService/SendEmail") >= 1
    assert _sample(text, "postmesh_consumer_pending", stream="POSTMESH_OUTBOUND") == 0
    families = _families(text)
    for metric in vars(metrics).values():
        if hasattr(metric, "_name") and hasattr(metric, "_type"):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            assert name in families, name


def test_dashboard_refers_only_to_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    referenced = {m for expr in expressions for m in re.findall(r"\bpostmesh_[a-z0-9_]+", expr)}
    exported = {
        metric._name + ("_total" if metric._type == "counter" else "")
        for metric in [*vars(metrics).values(), *_server_metrics()]
        if hasattr(metric, "_name") and hasattr(metric, "_type")
    }
    for name in referenced:
        base = next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), name)
        assert base in exported, f"the dashboard refers to {name}, which postmesh does not export"
    # Every metric operators alert on has a panel.
    assert exported <= {next((n.removesuffix(s) for s in SUFFIXES if n.endswith(s)), n) for n in referenced}


def _server_metrics() -> list[object]:
    from postmesh.common.server import RPC_COUNT, RPC_SECONDS

    return [RPC_COUNT, RPC_SECONDS]
