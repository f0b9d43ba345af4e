"""Calls between services are spread over every replica a name resolves to (round_robin), so one
long-lived channel does not pin a caller to the first replica (Kubernetes: headless Services)."""

from __future__ import annotations

import collections

import grpc
from grpc import aio

from postmesh.common.clients import MeshClients


async def _replica(name: bytes) -> tuple[aio.Server, int]:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        return name

    server = aio.server()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(who)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Replica", {"Who": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def test_calls_between_services_are_balanced_over_every_replica() -> None:
    (first, port_a), (second, port_b) = await _replica(b"a"), await _replica(b"b")
    clients = MeshClients({"quota": f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}"}, "service-key")
    try:
        call: aio.UnaryUnaryMultiCallable[bytes, bytes] = clients.channel("quota").unary_unary(
            "/test.Replica/Who"
        )
        answers = collections.Counter([await call(b"", timeout=10) for _ in range(40)])
        # round_robin alternates; pick_first would send all 40 to one replica.
        assert answers[b"a"] >= 10 and answers[b"b"] >= 10, answers
    finally:
        await clients.close()
        await first.stop(None)
        await second.stop(None)
