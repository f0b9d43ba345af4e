"""The peer `make bench` measures postmesh against, in the same run: a private Postfix instance relaying
into the bench's SMTP sink, with the OpenDKIM milter signing every message with the same RSA key and
domain postmesh signs with. It touches nothing of the system's Postfix: its configuration, queue and
logs live in a folder of its own, its SMTP server listens on a loopback port. Debian packages postfix,
opendkim (and opendkim-tools) provide it; without them the bench says so and prints no ratio.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from postmesh.common.natsserver import free_port

POSTFIX = "/usr/sbin/postfix"
OPENDKIM = "/usr/sbin/opendkim"


def missing() -> str:
    """What is missing to run the peer ('' when nothing is)."""
    absent = [p for p in (POSTFIX, OPENDKIM) if not Path(p).exists()]
    if absent:
        return "not installed: " + ", ".join(absent) + " (Debian packages postfix, opendkim)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    return ""


def _postconf_default(name: str) -> str:
    out = subprocess.run(["postconf", "-dh", name], capture_output=True, text=True, check=True).stdout
    return out.strip()


class PostfixPeer:
    """A private Postfix + OpenDKIM relaying to `sink_port`, signing as `domain` with `selector`."""

    def __init__(self, workdir: Path, *, sink_port: int, key_pem: bytes, domain: str, selector: str) -> None:
        self.dir = workdir
        self.sink_port = sink_port
        self.key_pem = key_pem
        self.domain = domain
        self.selector = selector
        self.port = free_port()
        self.milter_port = free_port()
        self.opendkim: subprocess.Popen[bytes] | None = None

    def _write_opendkim(self) -> Path:
        opendkim_user = "opendkim" if _user_exists("opendkim") else "root"
        self.dir.mkdir(parents=True, exist_ok=True)
        # Postfix's and OpenDKIM's own users must reach their files inside the bench's private folders
        # (made 0700 by tempfile): they may pass through them, not list them.
        for folder in (self.dir, *self.dir.parents):
            mode = folder.stat().st_mode
            if not mode & 0o001:
                folder.chmod(mode | 0o011)
        key = self.dir / "dkim.key"
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        shutil.chown(key, opendkim_user)
        conf = self.dir / "opendkim.conf"
        conf.write_text(
            "Syslog no\n"
            "Background no\n"
            "Mode s\n"
            f"Domain {self.domain}\n"
            f"Selector {self.selector}\n"
            f"KeyFile {key}\n"
            "Canonicalization relaxed/relaxed\n"
            f"Socket inet:{self.milter_port}@127.0.0.1\n"
            f"UserID {opendkim_user}\n"
            f"PidFile {self.dir / 'opendkim.pid'}\n"
            # The bench works under the system's temporary folder, which others may write to.
            "RequireSafeKeys false\n"
        )
        return conf

    def _write_postfix(self) -> Path:
        etc, spool, data, logs = (self.dir / n for n in ("etc", "spool", "data", "log"))
        for folder in (etc, spool, data, logs):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.chown(data, "postfix")
        main = {
            "compatibility_level": "3.6",
            "config_directory": str(etc),
            "queue_directory": str(spool),
            "data_directory": str(data),
            "daemon_directory": _postconf_default("daemon_directory"),
            "shlib_directory": _postconf_default("shlib_directory"),
            "meta_directory": _postconf_default("meta_directory"),
            "myhostname": "postfix-peer.bench.test",
            "mydestination": "",
            "inet_protocols": "ipv4",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_milters": f"inet:127.0.0.1:{self.milter_port}",
            "non_smtpd_milters": "$smtpd_milters",
            "milter_default_action": "tempfail",
            "alias_maps": "",
            "alias_database": "",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            # One destination (the sink): as many parallel deliveries to it as the bench offers.
            "default_destination_concurrency_limit": "64",
            "relay_destination_concurrency_limit": "64",
            "default_process_limit": "200",
            "maillog_file": str(logs / "postfix.log"),
            "maillog_file_prefixes": str(logs),
        }
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if line.startswith(("#", " ", "\t")) or len(fields) < 8:
                lines.append(line)
                continue
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{self.port}"
            fields[4] = "n"  # no chroot: the private instance has no chroot jail set up
            lines.append("  ".join(fields))
        (etc / "master.cf").write_text("\n".join(lines) + "\n")
        return etc

    def start(self) -> None:
        conf = self._write_opendkim()
        log = (self.dir / "opendkim.log").open("wb")
        self.opendkim = subprocess.Popen([OPENDKIM, "-f", "-x", str(conf)], stdout=log, stderr=log)
        self.etc = self._write_postfix()
        # postfix logs its start-up errors to syslog, which is absent here: keep its output instead.
        subprocess.run([POSTFIX, "-c", str(self.etc), "check"], capture_output=True, timeout=60)
        started = subprocess.run(
            [POSTFIX, "-c", str(self.etc), "start"], capture_output=True, text=True, timeout=60
        )
        if started.returncode != 0:
            raise RuntimeError(f"postfix did not start: {started.stdout}{started.stderr}")
        _wait_port(self.port, "postfix")
        _wait_port(self.milter_port, "opendkim")

    def stop(self) -> None:
        if hasattr(self, "etc"):
            subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True, timeout=60)
        if self.opendkim is not None and self.opendkim.poll() is None:
            self.opendkim.terminate()
            try:
                self.opendkim.wait(10)
            except subprocess.TimeoutExpired:
                self.opendkim.kill()

    def log_tail(self) -> str:
        path = self.dir / "log" / "postfix.log"
        return path.read_text()[-2000:] if path.exists() else ""


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _wait_port(port: int, what: str, within: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + within
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port}") from None
            time.sleep(0.1)


def bench_message(n: int, body: str, domain: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"Bench <news@{domain}>"
    message["To"] = f"user{n}@sink.test"
    message["Subject"] = f"Postfix benchmark {n}"
    message["Message-ID"] = f"<postfix-{n}-{time.time_ns()}@{domain}>"
    message.set_content(body)
    return message.as_bytes()


async def submit(port: int, messages: list[bytes], concurrency: int, sender: str) -> int:
    """Sends every message over SMTP on `concurrency` connections, each reused for its share, as a
    well-behaved client (an application, or postmesh's own workers) does. Returns how many Postfix took."""
    accepted = 0
    recipient = re.compile(rb"^To: (.+)$", re.M)

    async def connection(share: list[bytes]) -> None:
        nonlocal accepted
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60, start_tls=False) as smtp:
            for data in share:
                found = recipient.search(data)
                to = found.group(1).decode() if found else "user@sink.test"
                await smtp.sendmail(sender, [to], data)
                accepted += 1

    await asyncio.gather(*(connection(messages[i::concurrency]) for i in range(concurrency)))
    return accepted
