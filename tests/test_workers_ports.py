"""The supervisor of `serve all`'s workers gives every listen address with port 0 one port of its
own, shared by the workers, and leaves named ports alone."""

from __future__ import annotations

from postmesh.common.workers import SHARED_LISTEN_SETTINGS, WorkerRole, process_count, with_fixed_ports


def test_port_zero_listeners_get_distinct_fixed_ports() -> None:
    environ = {name: "127.0.0.1:0" for name in SHARED_LISTEN_SETTINGS}
    environ["GRPC_LISTEN"] = "127.0.0.1:50999"
    environ["HEALTH_LISTEN"] = ""
    fixed = with_fixed_ports(environ, {})
    assert "GRPC_LISTEN" not in fixed and "HEALTH_LISTEN" not in fixed
    assert set(fixed) == set(SHARED_LISTEN_SETTINGS) - {"GRPC_LISTEN", "HEALTH_LISTEN"}
    ports = [value.rpartition(":")[2] for value in fixed.values()]
    assert all(port != "0" for port in ports)
    assert len(set(ports) | {"50999"}) == len(ports) + 1


def test_defaults_count_when_the_environment_is_silent() -> None:
    fixed = with_fixed_ports({}, {"GRPC_LISTEN": "127.0.0.1:0"})
    assert list(fixed) == ["GRPC_LISTEN"]


def test_roles_and_process_counts() -> None:
    assert WorkerRole().primary and not WorkerRole().shares_ports
    second = WorkerRole.from_environment({"POSTMESH_WORKER_INDEX": "1", "POSTMESH_WORKER_COUNT": "2"})
    assert not second.primary and second.shares_ports
    assert not second.listen_when_ready and not WorkerRole().listen_when_ready
    restarted = WorkerRole.from_environment(
        {"POSTMESH_WORKER_INDEX": "0", "POSTMESH_WORKER_COUNT": "2", "POSTMESH_WORKER_LISTEN_WHEN_READY": "1"}
    )
    assert restarted.primary and restarted.listen_when_ready
    assert process_count(3) == 3
    assert process_count(0) >= 1
