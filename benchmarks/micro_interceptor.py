"""Micro-benchmark of MeshInterceptor's own CPU per gRPC call.

    .venv/bin/python benchmarks/micro_interceptor.py [--calls 30000] [--runs 3] [--baseline DIR]

Each call is what grpc.aio does per RPC: intercept_service (the continuation answering the method's
handler at once), then the handler it returned, around a behaviour that returns at once, with a fake
context and an authenticator that accepts. No network, no logging configured (an account's call is
logged at INFO by `serve`, which this leaves out). CPU is time.process_time over `--calls`, after a
warm-up. With `--baseline DIR` (a copy of the tree before a change), runs alternate between DIR and
this tree; prints min / median / max per tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import alternated

METHOD = "/postmesh.sender.v1.SenderService/SendEmail"


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class _Context:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer key"), ("user-agent", "grpc-python"))

    def code(self) -> None:
        return None


async def _measure(calls: int) -> float:
    import grpc

    from postmesh.common.auth import Access, Principal, PrincipalKind
    from postmesh.common.server import MeshInterceptor

    class Runtime:
        ready = asyncio.Event()

    class Service:
        name = "sender"
        runtime = Runtime()

        def access_for(self, method: str) -> Access:
            return Access.ACCOUNT

    class Accepting:
        async def authenticate(self, metadata: dict[str, str], access: Access) -> Principal:
            return Principal(PrincipalKind.ACCOUNT, account_id="111111111111")

    Runtime.ready.set()

    async def behaviour(request: bytes, context: Any) -> bytes:
        return b"done"

    handler = grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=bytes, response_serializer=bytes
    )
    interceptor = MeshInterceptor({"postmesh.sender.v1.SenderService": Service()}, Accepting())  # type: ignore[dict-item, arg-type]

    async def continuation(details: Any) -> Any:
        return handler

    details, context = _Details(METHOD, ()), _Context()

    async def call() -> None:
        wrapped = await interceptor.intercept_service(continuation, details)  # type: ignore[arg-type]
        assert wrapped is not None and wrapped.unary_unary is not None
        await wrapped.unary_unary(b"request", context)  # type: ignore[arg-type]

    for _ in range(2000):
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        from postmesh.common.eventloop import new_event_loop

        loop = new_event_loop("auto")
        print(json.dumps({"cpu_per_call": loop.run_until_complete(_measure(int(sys.argv[2])))}))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=30000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a copy of the tree before the change")
    args = parser.parse_args()
    alternated.compare(
        __file__,
        [args.calls],
        "cpu_per_call",
        runs=args.runs,
        baseline=args.baseline,
        unit="µs CPU/call",
        scale=1e6,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
