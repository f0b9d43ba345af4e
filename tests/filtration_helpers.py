"""Real content scanners for tests: clamd with a signature database the test writes (the EICAR test
file's MD5, since freshclam cannot reach its mirrors here) and rspamd with its packaged rules, each
on a free loopback port; and hostile content to feed them."""

from __future__ import annotations

import io
import subprocess
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

import pytest

from postmesh.common.natsserver import free_port
from postmesh.testing_mail import LoopbackDns, SmtpServer
from postmesh.testing_scanners import ClamdProcess, find_binary, wait_port

# Small limits, so the hostile-content cases stay small.
STREAM_MAX_BYTES = 1024 * 1024


def require(binary: str) -> str:
    path = find_binary(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package clamav-daemon / rspamd)")
    return path


class Clamd(ClamdProcess):
    def __init__(self, folder: Path) -> None:
        super().__init__(folder, binary=require("clamd"), stream_max_bytes=STREAM_MAX_BYTES)


def mail(attachment: bytes | None = None, filename: str = "file.bin", *, body: str = "Hello.") -> bytes:
    message = EmailMessage()
    message["From"] = "news@example.test"
    message["To"] = "someone@ok.test"
    message["Subject"] = "Files"
    message.set_content(body)
    if attachment is not None:
        message.add_attachment(attachment, maintype="application", subtype="octet-stream", filename=filename)
    return message.as_bytes()


def raw_base64_part(payload: bytes) -> bytes:
    """A hand-written raw MIME message whose second part is `payload`, base64 with no file name."""
    import base64

    encoded = base64.encodebytes(payload)
    return (
        b"From: news@example.test\r\nTo: someone@ok.test\r\nSubject: raw\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n'
        b"Hi\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + encoded.replace(b"\n", b"\r\n")
        + b"--b1--\r\n"
    )


def zipped(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def encrypted_zip() -> bytes:
    """A zip whose member is flagged encrypted (general purpose bit 0), as a password-protected one is."""
    data = bytearray(zipped(("secret.txt", b"not for scanners " * 20)))
    data[data.find(b"PK\x03\x04") + 6] |= 1
    data[data.find(b"PK\x01\x02") + 8] |= 1
    return bytes(data)


def nested_zip(depth: int) -> bytes:
    data = b"innermost"
    for level in range(depth):
        data = zipped((f"level{level}.zip", data))
    return data


def zip_bomb() -> bytes:
    """22 KB of zip that expands to 15 MB, past clamd's MaxScanSize."""
    return zipped(*((f"zeros{i}", bytes(1536 * 1024)) for i in range(10)))


class Rspamd:
    """A private rspamd with its packaged rules: workers on free loopback ports, state in `folder`.
    It takes about ten seconds to start: one per test module."""

    def __init__(self, folder: Path) -> None:
        self.binary = require("rspamd")
        self.folder = folder
        self.port = free_port("127.0.0.1")
        self.process: subprocess.Popen[bytes] | None = None
        local = folder / "local.d"
        for sub in ("local.d", "db", "run", "log"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        workers = {"normal": self.port, "controller": free_port("127.0.0.1"), "proxy": free_port("127.0.0.1")}
        for name, port in workers.items():
            (local / f"worker-{name}.inc").write_text(f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')
        (local / "logging.inc").write_text(
            f'type = "file";\nfilename = "{folder / "log" / "rspamd.log"}";\nlevel = "error";\n'
        )
        # No network here: DNS-based rules give up quickly.
        (local / "options.inc").write_text("dns { timeout = 0.5s; retransmits = 1; }\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Rspamd:
        folder = self.folder
        self.process = subprocess.Popen(
            [
                self.binary,
                "-f",
                "-u",
                "root",
                "-g",
                "root",
                "-i",
                f"--var=LOCAL_CONFDIR={folder}",
                f"--var=DBDIR={folder / 'db'}",
                f"--var=RUNDIR={folder / 'run'}",
                f"--var=LOGDIR={folder / 'log'}",
                "-p",
                str(folder / "run" / "rspamd.pid"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.process, 90, "rspamd")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.process = None


def spammy_mail(message_id: str) -> bytes:
    """What rspamd's packaged rules score about 9 (no Date, shouting subject, shortened link)."""
    return (
        f"Message-ID: <{message_id}@example.test>\r\nFrom: news@example.test\r\nTo: someone@ok.test\r\n"
        "Subject: VIAGRA CHEAP!!! FREE MONEY\r\n\r\nBuy now, click http://bit.ly/xyz\r\n"
    ).encode()


@contextmanager
def receiving_server() -> Iterator[tuple[SmtpServer, LoopbackDns]]:
    """An SMTP server on 127.0.0.2, the MX of ok.test in a DNS server of its own."""
    port = free_port("127.0.0.2")
    with SmtpServer("127.0.0.2", port) as smtp, LoopbackDns() as dns:
        dns.add_mx("ok.test", "mx.ok.test", 10)
        dns.add_a("mx.ok.test", "127.0.0.2")
        yield smtp, dns
