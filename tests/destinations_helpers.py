"""A webhook receiver on loopback for the destinations tests: a real HTTP server in a thread."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from postmesh.client import Client
from postmesh.common.natsserver import free_port
from postmesh.feedback.v1 import configuration_sets_pb2 as cs


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """Records every POST; answers `status` (200 unless set otherwise). `start` may come late: the port
    is chosen first, so a destination can point at a receiver that is not up yet."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.status = 200
        # When set, every request waits for it before being answered: a slow endpoint.
        self.gate: threading.Event | None = None
        self.waiting = 0
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hooks/ses"

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.gate is not None:
                    with receiver._lock:
                        receiver.waiting += 1
                    receiver.gate.wait(120)
                if receiver.status == 200:
                    with receiver._lock:
                        receiver._deliveries.append(Delivery(self.path, dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, done: Callable[[list[Delivery]], bool], within: float = 60.0) -> list[Delivery]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if done(self.deliveries):
                return self.deliveries
            time.sleep(0.1)
        raise AssertionError(f"webhook deliveries never matched; got {len(self.deliveries)}")


def webhook(url: str, *types: int, enabled: bool = True) -> cs.EventDestinationDefinition:
    return cs.EventDestinationDefinition(
        enabled=enabled,
        matching_event_types=list(types),  # type: ignore[arg-type]
        webhook=cs.WebhookDestination(url=url),
    )


class Follower:
    """A SubscribeEvents client: the requests are a queue (the first opens, later ones acknowledge)."""

    def __init__(self, client: Client, name: str) -> None:
        self._requests: queue.Queue[cs.SubscribeEventsRequest | None] = queue.Queue()
        self._requests.put(cs.SubscribeEventsRequest(subscription_name=name))
        self.call = client.feedback.SubscribeEvents(iter(self._requests.get, None))
        self.call.initial_metadata()  # the subscription exists from here on
        self.received: list[cs.SubscribeEventsResponse] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                with self._lock:
                    self.received.append(response)
        except grpc.RpcError:
            pass

    def events(self) -> list[cs.SubscribeEventsResponse]:
        with self._lock:
            return list(self.received)

    def wait_for(self, count: int, within: float = 60.0) -> list[cs.SubscribeEventsResponse]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and len(self.events()) < count:
            time.sleep(0.1)
        return self.events()

    def ack(self, *event_ids: str) -> None:
        self._requests.put(cs.SubscribeEventsRequest(ack_event_ids=list(event_ids)))

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(10)
