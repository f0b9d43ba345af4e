"""Several worker processes of one `postmesh serve all` on one machine, one per core.

A Python process runs on one core (one event loop). `serve all` with SERVE_PROCESSES > 1 becomes a
supervisor that starts that many workers, each the same `serve` command: every worker listens on the
same gRPC, SMTP and HTTP ports (SO_REUSEPORT: the kernel spreads connections over them), hosts the
accept path, and runs delivery workers on the shared durable JetStream consumers (each message goes to
one worker). Background work that must not run N times (the DNS checker, quota housekeeping and
automatic increases, the statistics consumer, feedback housekeeping, the webhook dispatcher) runs in
worker 0 only (`WorkerRole.primary`, `Runtime.spawn_once`). Worker 0 starts first; the others once it
is SERVING. A worker that dies is started again; the supervisor stops them all on SIGTERM or SIGINT,
and they die with it when it is killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from postmesh.common.natsserver import free_port

log = logging.getLogger(__name__)

# How the supervisor tells a worker who it is (internal: not a setting anyone configures).
WORKER_INDEX_ENV = "POSTMESH_WORKER_INDEX"
WORKER_COUNT_ENV = "POSTMESH_WORKER_COUNT"
WORKER_READY_FILE_ENV = "POSTMESH_WORKER_READY_FILE"
WORKER_LISTEN_WHEN_READY_ENV = "POSTMESH_WORKER_LISTEN_WHEN_READY"

# Listeners every worker shares. Port 0 ("any free port") would give each worker a port of its own,
# so the supervisor picks one port first. SNS_HTTPS_LISTEN is not shared: the SNS endpoint answers
# subscription confirmations for the webhook dispatcher, which runs in worker 0 only.
SHARED_LISTEN_SETTINGS = (
    "GRPC_LISTEN",
    "HEALTH_LISTEN",
    "IDENTITY_HTTP_LISTEN",
    "HTTP_API_LISTEN",
    "TRACKING_HTTP_LISTEN",
    "INBOUND_SMTP_LISTEN",
    "SMTP_STARTTLS_LISTEN",
    "SMTP_TLS_LISTEN",
)

_PR_SET_PDEATHSIG = 1
try:  # loaded here, not in the child between fork and exec
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


@dataclass(frozen=True)
class WorkerRole:
    """Which worker this process is: index 0 of 1 when it runs alone."""

    index: int = 0
    count: int = 1
    # Made once every service of the worker is SERVING: the supervisor starts the other workers only
    # then, so that files made on first start (keys in DATA_DIR) and migrations are made once.
    ready_file: str = ""
    # Started while a sibling serves (every start but the first worker's first): the gRPC port is
    # bound once every service is SERVING, so the kernel hands this worker no connection before it
    # can answer (a worker listening while it starts would answer "starting" to some new clients).
    listen_when_ready: bool = False

    @property
    def primary(self) -> bool:
        """Runs the background singletons."""
        return self.index == 0

    @property
    def shares_ports(self) -> bool:
        """Listens with SO_REUSEPORT beside its sibling workers."""
        return self.count > 1

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> WorkerRole:
        environ = os.environ if environ is None else environ
        if WORKER_INDEX_ENV not in environ:
            return cls()
        return cls(
            int(environ[WORKER_INDEX_ENV]),
            int(environ[WORKER_COUNT_ENV]),
            environ.get(WORKER_READY_FILE_ENV, ""),
            environ.get(WORKER_LISTEN_WHEN_READY_ENV) == "1",
        )

    def announce_ready(self) -> None:
        if self.ready_file:
            Path(self.ready_file).touch()


def process_count(configured: int) -> int:
    """SERVE_PROCESSES, 0 meaning one per core this process may run on."""
    if configured < 0:
        raise ValueError(f"SERVE_PROCESSES must be 0 (one per core) or more, not {configured}")
    if configured:
        return configured
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def with_fixed_ports(environ: Mapping[str, str], defaults: Mapping[str, str]) -> dict[str, str]:
    """The listen settings that ask for port 0, each given one free port for every worker to share."""
    values = {name: environ.get(name, defaults.get(name, "")) for name in SHARED_LISTEN_SETTINGS}
    # The ports already named: a free port is free until someone binds it, and none is bound yet.
    taken = {value.rpartition(":")[2] for value in values.values()}
    fixed = {}
    for name, value in values.items():
        host, sep, port = value.rpartition(":")
        if sep and port == "0":
            chosen = str(free_port(host.strip("[]") or "0.0.0.0"))
            while chosen in taken:
                chosen = str(free_port(host.strip("[]") or "0.0.0.0"))
            taken.add(chosen)
            fixed[name] = f"{host}:{chosen}"
    return fixed


def _die_with_parent() -> None:
    """In the worker, before exec: the kernel kills it when the supervisor dies, even by SIGKILL, so
    no worker outlives the process that was started (and is stopped) as `postmesh serve all`."""
    prctl = getattr(_LIBC, "prctl", None)  # Linux only
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Supervisor:
    """Starts `count` workers running `argv` (a `postmesh` command line), restarts one that dies,
    and passes SIGTERM and SIGINT on to all of them."""

    def __init__(self, argv: Sequence[str], count: int, env: Mapping[str, str]) -> None:
        self.argv = list(argv)
        self.count = count
        self.env = dict(env)
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False

    def _start(self, index: int, ready_file: Path | None = None) -> None:
        env = {**self.env, WORKER_INDEX_ENV: str(index), WORKER_COUNT_ENV: str(self.count)}
        if ready_file is not None:
            env[WORKER_READY_FILE_ENV] = str(ready_file)
        else:  # the first worker serves already (or another does, when this one is started again)
            env[WORKER_LISTEN_WHEN_READY_ENV] = "1"
        self.workers[index] = subprocess.Popen(
            [sys.executable, "-m", "postmesh.cli.main", *self.argv],
            env=env,
            preexec_fn=_die_with_parent,  # only prctl() between fork and exec
        )
        log.info("worker started", extra={"worker": index, "pid": self.workers[index].pid})

    def _stop(self, signum: int, _frame: object) -> None:
        self._stopping = True
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signum)

    def run(self) -> int:
        """Runs until the workers have stopped after a signal; returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        with tempfile.TemporaryDirectory(prefix="postmesh-workers-") as folder:
            ready = Path(folder) / "ready"
            self._start(0, ready)
            while not ready.exists():
                if self._stopping or self.workers[0].poll() is not None:
                    break
                time.sleep(0.1)
            if not self._stopping and self.workers[0].poll() is None:
                for index in range(1, self.count):
                    self._start(index)
            return self._watch()

    def _watch(self) -> int:
        status = 0
        while self.workers:
            time.sleep(0.2)
            for index, process in list(self.workers.items()):
                code = process.poll()
                if code is None:
                    continue
                del self.workers[index]
                if self._stopping:
                    status = max(status, code if code > 0 else 0)
                    continue
                if code > 0:
                    # A setting is wrong, or start-up failed (what a single process would exit with):
                    # starting it again would only fail again. Stop the others and report it.
                    log.error("worker failed; stopping the others", extra={"worker": index, "code": code})
                    self._stop(signal.SIGTERM, None)
                    status = code
                    continue
                # Killed (by a signal, the OOM killer...) or stopped on its own: the others serve
                # meanwhile, and what it had not acknowledged goes to them.
                log.error("worker died; starting it again", extra={"worker": index, "code": code})
                self._start(index)
        return status
