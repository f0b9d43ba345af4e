"""A delivery worker SIGKILLed in the middle of a burst loses nothing: JetStream hands its unacked
messages to the next worker, with the same Message-ID. Duplicates are possible and are counted."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats

from postmesh.common.bus import ensure_streams
from postmesh.common.outbound import enqueue
from postmesh.testing_mail import Behaviour, SmtpServer
from tests.delivery_helpers import forget_delivery_consumer, new_account_id, queued_message, wait_until

BURST = 1000


def _worker(tmp_path: Path, name: str, nats_url: str, sink_port: int) -> subprocess.Popen[bytes]:
    """A real `postmesh serve sender` process delivering through the local SMTP sink."""
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "SERVICE_API_KEY": "crash-test-service-key",
        "GRPC_LISTEN": "127.0.0.1:0",
        "METRICS_PORT": "0",
        "DATA_DIR": str(tmp_path / name),
        "LOG_LEVEL": "WARNING",
        "DELIVERY_MODE": "smarthost",
        "SMARTHOST": f"127.0.0.1:{sink_port}",
        "SMARTHOST_TLS": "none",
        "DELIVERY_WORKERS": "32",
        # Short, so the killed worker's messages come back quickly.
        "DELIVERY_ACK_WAIT_SECONDS": "4",
    }
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "postmesh.cli.main", "serve", "sender"], env=env, stdout=log, stderr=log
    )


async def test_killing_a_worker_mid_burst_loses_no_message(nats_url: str, tmp_path: Path) -> None:
    account = new_account_id()
    messages = [queued_message(account, [f"user{n}@crash.test"], subject=f"burst {n}") for n in range(BURST)]
    expected = {m.message_id for m in messages}
    # PIPELINING offered, as real MX hosts do: the kill lands in pipelined transactions.
    with SmtpServer(behaviour=Behaviour(pipelining=True)) as sink:

        def arrived() -> collections.Counter[str]:
            counts: collections.Counter[str] = collections.Counter()
            for received in sink.received:
                mid = received.message_id.strip("<>").partition("@")[0]
                # make_msgid puts the id between a timestamp and the domain: match on the queued id.
                for message_id in (mid.rsplit(".", 1)[-1], mid):
                    if message_id in expected:
                        counts[message_id] += 1
                        break
            return counts

        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await ensure_streams(js)
        for message in messages:
            await enqueue(js, message)
        await nc.close()

        first = _worker(tmp_path, "first", nats_url, sink.port)
        try:
            await wait_until(lambda: len(sink.received) >= 150, within=90, what="the first worker to deliver")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        killed_at = len(arrived())
        second = _worker(tmp_path, "second", nats_url, sink.port)
        started = time.monotonic()
        try:
            await wait_until(lambda: set(arrived()) == expected, within=120, what="all messages to arrive")
        finally:
            second.terminate()
            second.wait(15)
        counts = arrived()
    await forget_delivery_consumer(nats_url)
    duplicates = sum(c - 1 for c in counts.values())
    print(
        f"\ncrash test: {BURST} queued, {killed_at} had arrived when the worker was killed, "
        f"all {len(counts)} arrived ({time.monotonic() - started:.1f}s after the restart), "
        f"{duplicates} duplicate deliveries"
    )
    assert set(counts) == expected
    assert killed_at < BURST  # the kill happened mid-burst
