"""EVENT_LOOP: the loop a postmesh process runs on, chosen in one place (postmesh.common.eventloop);
`postmesh serve all` on uvloop answers SendEmail and delivers."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from postmesh.common import eventloop
from postmesh.common.natsserver import NatsServerProcess
from tests.faults_helpers import Burst, Mesh, assert_delivered_once, loopback_mail

uvloop = pytest.importorskip("uvloop")


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_each_setting_runs_its_loop() -> None:
    assert eventloop.run(_loop_module(), "asyncio").startswith("asyncio")
    assert eventloop.run(_loop_module(), "uvloop").startswith("uvloop")
    # auto: uvloop, since it is installed
    assert eventloop.run(_loop_module(), "auto").startswith("uvloop")
    assert eventloop.resolve("auto") == "uvloop"
    assert eventloop.resolve("asyncio") == "asyncio"


def test_an_unknown_loop_is_refused_by_name() -> None:
    coroutine = _loop_module()
    with pytest.raises(ValueError, match="EVENT_LOOP"):
        eventloop.run(coroutine, "trio")
    # The coroutine is closed, not left to warn that it was never awaited.
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED


class AllInOne(Mesh):
    """One `postmesh serve all` process."""

    SERVICES = {"all": "all"}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports['all']}"


def test_serve_all_on_uvloop_sends_and_delivers(tmp_path: Path) -> None:
    nats = NatsServerProcess(tmp_path / "nats").start()
    try:
        with loopback_mail() as (dns, sink):
            env = {"EVENT_LOOP": "uvloop", "SERVE_PROCESSES": "1", "DELIVERY_WORKERS": "2"}
            mesh = AllInOne(tmp_path, nats.url, dns, sink, extra_env=env)
            try:
                mesh.start("all")
                # The process really runs uvloop: its extension module is mapped in.
                maps = Path(f"/proc/{mesh.processes['all'].pid}/maps").read_text()
                assert "uvloop/loop." in maps
                burst = Burst(mesh.address("all"), mesh.sending_account(), 3, threads=3)
                burst.run()
                assert_delivered_once(burst, sink, settle=1.0)
            finally:
                mesh.stop_all()
    finally:
        nats.stop()


_STUCK_SERVER = """
import asyncio, sys
from postmesh.common import eventloop
from postmesh.common.logging import configure_logging

async def stubborn() -> None:
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # the bug being guarded against: a task that ignores its cancellation

async def main() -> None:
    asyncio.create_task(stubborn(), name="stubborn-task")
    asyncio.create_task(asyncio.sleep(3600), name="polite-task")
    await asyncio.sleep(0.1)

configure_logging("INFO")
eventloop.run_server(main(), sys.argv[1], wait_seconds=0.5)
print("not reached", flush=True)
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_server_exits_past_a_task_that_ignores_its_cancellation_and_names_it(loop: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _STUCK_SERVER, loop], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert "did not end when cancelled" in printed and "stubborn-task" in printed
    assert "polite-task" not in printed and "not reached" not in printed


_COLLECTOR_PROBE = """
import asyncio, gc, sys, weakref
from postmesh.common import eventloop

class Node:
    pass

def cycle():
    node = Node()
    node.self = node
    return weakref.ref(node)

async def main() -> None:
    assert gc.get_threshold()[0] == eventloop.SERVER_GC_THRESHOLD
    made_while_starting = cycle()  # garbage already: the collection before the freeze takes it
    kept = Node()
    eventloop.server_ready()
    assert made_while_starting() is None
    frozen = gc.get_freeze_count()
    assert frozen > 1000 and gc.is_tracked(kept)
    eventloop.server_ready()  # said once per process: a second call freezes nothing more
    assert gc.get_freeze_count() == frozen
    later = cycle()
    gc.collect()
    assert later() is None  # what is made after the freeze is still collected
    print("ok", flush=True)

eventloop.server_ready()  # outside run_server: nothing frozen
assert gc.get_freeze_count() == 0 and gc.get_threshold()[0] != eventloop.SERVER_GC_THRESHOLD
eventloop.run_server(main(), sys.argv[1])
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_server_process_freezes_its_start_up_heap_once_serving(loop: str) -> None:
    """run_server raises the young-generation threshold; server_ready (said by MeshServer once every
    service serves) freezes what exists then, once; what comes later is still collected."""
    done = subprocess.run(
        [sys.executable, "-c", _COLLECTOR_PROBE, loop], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
