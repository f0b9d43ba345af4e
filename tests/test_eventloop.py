"""EVENT_LOOP: the loop a postmesh process runs on, chosen in one place (postmesh.common.eventloop);
`postmesh serve all` on uvloop answers SendEmail and delivers."""

from __future__ import annotations

import asyncio
import inspect
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
