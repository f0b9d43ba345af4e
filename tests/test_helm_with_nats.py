"""deploy/postmesh-with-nats: postmesh and the official NATS chart in one release.

The official chart comes from its repository with `helm dependency build`, which these tests may not
reach (loopback only). They check what is ours: the dependency is pinned and optional, and postmesh's
pods are pointed at the NATS Service of the release with three stream replicas. A stand-in chart named
`nats`, with a client Service named as the official chart names it, takes the official chart's place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_helm import CHART, _helm, _run

UMBRELLA = CHART.parent / "postmesh-with-nats"

STAND_IN_SERVICE = """\
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- $full := ternary .Release.Name (printf "%s-%s" .Release.Name $name) (contains $name .Release.Name) -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $full }}
spec:
  selector:
    app.kubernetes.io/name: nats
  ports:
    - name: nats
      port: 4222
"""


def _umbrella_with_dependencies(tmp_path: Path) -> Path:
    """A copy of the umbrella chart with its charts/ filled: postmesh packaged from deploy/k8s, and the
    stand-in for the official NATS chart at the pinned version."""
    chart = tmp_path / "postmesh-with-nats"
    shutil.copytree(UMBRELLA, chart, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    charts = chart / "charts"
    charts.mkdir()
    _run(_helm(), "package", str(CHART), "-d", str(charts), tmp_path=tmp_path)
    pinned = {d["name"]: d for d in yaml.safe_load((UMBRELLA / "Chart.yaml").read_text())["dependencies"]}
    nats = charts / "nats"
    (nats / "templates").mkdir(parents=True)
    (nats / "Chart.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v2", "name": "nats", "version": pinned["nats"]["version"]})
    )
    (nats / "values.yaml").write_text("config: {}\n")
    (nats / "templates" / "service.yaml").write_text(STAND_IN_SERVICE)
    return chart


def _render(chart: Path, release: str, tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"postmesh": yaml.safe_load((CHART / "values-ci.yaml").read_text())}))
    helm = _helm()
    _run(helm, "lint", "--strict", str(chart), "-f", str(values), *extra, tmp_path=tmp_path)
    text = _run(helm, "template", release, str(chart), "-f", str(values), *extra, tmp_path=tmp_path)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _nats_settings(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(NATS_URL, NATS_STREAM_REPLICAS) of every postmesh Deployment that uses NATS (all but the HTTP
    gateway, which only calls the services)."""
    found, users = set(), set()
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        env = {e["name"]: e.get("value") for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]}
        if "NATS_URL" in env:
            users.add(doc["metadata"]["name"].rsplit("-", 1)[1])
            found.add((env["NATS_URL"], env["NATS_STREAM_REPLICAS"]))
    assert {"identity", "quota", "sender", "delivery", "feedback"} <= users, users
    return found


def test_the_nats_dependency_is_the_official_chart_pinned_and_optional() -> None:
    chart = yaml.safe_load((UMBRELLA / "Chart.yaml").read_text())
    dependencies = {d["name"]: d for d in chart["dependencies"]}
    nats = dependencies["nats"]
    assert nats["repository"] == "https://nats-io.github.io/k8s/helm/charts/"
    assert all(part.isdigit() for part in nats["version"].split(".")), "pinned: an exact version"
    assert nats["condition"] == "nats.enabled"
    assert dependencies["postmesh"]["repository"] == "file://../k8s"
    postmesh_chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert dependencies["postmesh"]["version"] == postmesh_chart["version"]
    values = yaml.safe_load((UMBRELLA / "values.yaml").read_text())["nats"]
    assert values["enabled"] is True
    assert values["config"]["jetstream"]["enabled"] is True
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}


@pytest.mark.parametrize(("release", "service"), [("mail", "mail-nats"), ("nats-prod", "nats-prod")])
def test_postmesh_uses_the_release_s_nats_with_three_stream_replicas(
    release: str, service: str, tmp_path: Path
) -> None:
    docs = _render(_umbrella_with_dependencies(tmp_path), release, tmp_path)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert service in services
    assert _nats_settings(docs) == {(f"nats://{service}:4222", "3")}


def test_nats_disabled_uses_an_existing_cluster(tmp_path: Path) -> None:
    docs = _render(
        _umbrella_with_dependencies(tmp_path),
        "mail",
        tmp_path,
        "--set",
        "nats.enabled=false",
        "--set",
        "postmesh.nats.url=tls://nats.messaging.svc:4222",
    )
    assert "mail-nats" not in {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert _nats_settings(docs) == {("tls://nats.messaging.svc:4222", "3")}
