"""The Helm chart runs the HTTP gateway as its own Deployment and Service."""

from __future__ import annotations

from typing import Any

from tests.test_helm import rendered

__all__ = ["rendered"]  # the fixture, rendered and validated once per test


def test_the_gateway_has_its_own_deployment_and_service(rendered: list[dict[str, Any]]) -> None:
    deployment = next(
        d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "pm-postmesh-gateway"
    )
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["serve", "gateway"]
    assert {"name": "http", "containerPort": 8025} in container["ports"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HTTP_API_LISTEN"]["value"] == "0.0.0.0:8025"
    assert env["IDENTITY_ENDPOINT"]["value"] == "dns:///pm-postmesh-identity-headless:50051"
    assert "secretKeyRef" in env["SERVICE_API_KEY"]["valueFrom"]
    # Only the service credential: the gateway needs no database, admin key or DKIM master key.
    assert not {"ADMIN_API_KEY", "DATABASE_URL", "DKIM_MASTER_KEYS"} & set(env)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    service = next(
        d for d in rendered if d["kind"] == "Service" and d["metadata"]["name"] == "pm-postmesh-gateway"
    )
    assert service["spec"]["ports"] == [{"name": "http", "port": 8025, "targetPort": "http"}]
    policy = next(
        d for d in rendered if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "pm-postmesh-gateway"
    )
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "http"}]
    # Its metrics (requests by SES operation and status) are scraped like the services'.
    assert {"name": "metrics", "containerPort": 9464} in container["ports"]
    assert env["METRICS_PORT"]["value"] == "9464"
    assert policy["spec"]["ingress"][1]["ports"] == [{"port": "metrics"}]
