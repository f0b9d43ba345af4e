"""What `make bench` reads from the processes it runs (CPU time and peak RSS from /proc), how it waits
for them, and the SMTP sink every message ends in (a process of its own)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from postmesh.client import Client


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set (VmHWM), in MB; NaN once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """User + system CPU of a process (and of the children it reaped); NaN once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def workers_of(pid: int) -> list[int]:
    """The worker processes of a `postmesh serve all` supervisor, oldest first (none when it runs
    alone)."""
    try:
        return sorted(int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return []


def cpu_seconds_of_serve(pid: int) -> float:
    """CPU of `serve all`: itself, its live workers, and the workers it already reaped."""
    return cpu_seconds(pid, with_children=True) + sum(cpu_seconds(child) for child in workers_of(pid))


def peak_rss_of_serve(pid: int) -> dict[str, float]:
    """Peak RSS of each process of `serve all`: the supervisor and its workers, or the one process."""
    workers = workers_of(pid)
    if not workers:
        return {"serve all": peak_rss_mb(pid)}
    return {
        "supervisor": peak_rss_mb(pid),
        **{f"worker {n + 1}": peak_rss_mb(child) for n, child in enumerate(workers)},
    }


def wait_serving(address: str, deadline: float) -> None:
    with Client(address) as client:
        if not client.wait_serving(deadline - time.monotonic()):
            raise TimeoutError("postmesh did not become SERVING")


def listens_on(pid: int, port: int) -> bool:
    """Whether the process holds a TCP socket listening on `port` (IPv4 or IPv6, any address)."""
    listening: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address "ADDR:PORT" in hex, state 0A = LISTEN, the socket's inode
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                listening.add(fields[9])
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            return True
    return False


def wait_workers(pid: int, processes: int, address: str, deadline: float) -> None:
    """Every worker of `serve all` started, listening on the shared port, and SERVING: health asked
    on fresh connections, which the kernel spreads over the workers listening. (Workers after the
    first start once the first serves, and listen only once they serve themselves: one that does not
    listen yet gets no probe.)"""
    port = int(address.rpartition(":")[2])
    while len(workers := workers_of(pid)) < processes or not all(listens_on(w, port) for w in workers):
        if time.monotonic() > deadline:
            raise TimeoutError("postmesh serve all did not start its workers")
        time.sleep(0.2)
    for _ in range(8 * processes):
        channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("a worker of postmesh serve all did not become SERVING")
                time.sleep(0.2)
        finally:
            channel.close()


def sink_main(port: int, count_file: str) -> None:
    """The receiving end: an aiosmtpd server that takes every message (a process of its own), and
    writes how many it took to `count_file` (what the Postfix peer's rate is read from)."""
    from aiosmtpd.controller import Controller

    received = 0

    class Accept:
        async def handle_EHLO(
            self, server: object, session: Any, envelope: object, hostname: str, responses: list[str]
        ) -> list[str]:
            # As every real MX host does: the delivery workers pipeline (RFC 2920) when offered.
            session.host_name = hostname
            return [*responses[:-1], "250-PIPELINING", responses[-1]]

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            nonlocal received
            received += 1
            return "250 2.0.0 OK"

    controller = Controller(Accept(), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    counter = Path(count_file)
    while not stop:
        counter.write_text(str(received))
        time.sleep(0.02)
    controller.stop()


def sink_count(count_file: Path) -> int:
    try:
        return int(count_file.read_text() or 0)
    except (OSError, ValueError):
        return 0


def wait_count(count_file: Path, wanted: int, within: float) -> tuple[int, float]:
    """Waits until the sink has taken `wanted` messages (or `within` passes): (count, when it last grew)."""
    deadline = time.perf_counter() + within
    count, grew = sink_count(count_file), time.perf_counter()
    while count < wanted and time.perf_counter() < deadline:
        time.sleep(0.02)
        now = sink_count(count_file)
        if now != count:
            count, grew = now, time.perf_counter()
    return count, grew


def cpu_seconds_of_instance(folder: Path) -> float:
    """CPU used by the processes whose command line or environment names `folder` (the Postfix peer's
    master, its daemons, and opendkim), with the children they already reaped."""
    marker = str(folder).encode()
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            found = marker in (proc / "cmdline").read_bytes() or marker in (proc / "environ").read_bytes()
        except OSError:
            continue
        if found:
            total += cpu_seconds(int(proc.name), with_children=True)
    return total
