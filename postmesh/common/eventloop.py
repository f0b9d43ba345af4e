"""The event loop a postmesh process runs on (EVENT_LOOP): asyncio's own, or uvloop.

Every entry point that runs the mesh goes through `run` (or `new_event_loop` for a loop in a thread),
so the choice is made in one place. uvloop (libuv) runs the same coroutines with less CPU per
callback; grpc.aio, nats-py, aiosqlite, aiohttp and aiosmtpd (whose STARTTLS drives asyncio's
SSLProtocol over the loop's transport) all run on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# The values of the EVENT_LOOP setting (postmesh.common.config).
EVENT_LOOPS = ("asyncio", "uvloop", "auto")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new loop of kind `name` (one of EVENT_LOOPS)."""
    if name not in EVENT_LOOPS:
        raise ValueError(f"EVENT_LOOP: {name!r} is none of {', '.join(EVENT_LOOPS)}")
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ValueError("EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def new_event_loop(name: str) -> asyncio.AbstractEventLoop:
    return loop_factory(name)()


def run(main: Coroutine[Any, Any, T], name: str) -> T:
    """asyncio.run(main) on a loop of kind `name`."""
    try:
        factory = loop_factory(name)
    except ValueError:
        main.close()  # never awaited: say nothing more than the setting's error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def resolve(name: str) -> str:
    """The loop `name` runs on: "asyncio" or "uvloop" ("auto" is either)."""
    return "uvloop" if loop_factory(name).__module__.startswith("uvloop") else "asyncio"
