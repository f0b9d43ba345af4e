"""The event loop a postmesh process runs on (EVENT_LOOP): asyncio's own, or uvloop.

Every entry point that runs the mesh goes through `run` (or `new_event_loop` for a loop in a thread),
so the choice is made in one place. uvloop (libuv) runs the same coroutines with less CPU per
callback; grpc.aio, nats-py, aiosqlite, aiohttp and aiosmtpd (whose STARTTLS drives asyncio's
SSLProtocol over the loop's transport) all run on it.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

# How long a server's tasks left over after its shutdown get to end once cancelled.
LEFTOVER_TASKS_WAIT_SECONDS = 10.0

# The cyclic garbage collector's youngest-generation threshold in a server process (CPython's default
# is 700): a busy server allocates containers by the thousand per second, and each young collection
# also pays for walking the survivors; fewer, larger ones cost less in all.
SERVER_GC_THRESHOLD = 10_000
_freeze_heap_when_ready = False

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


def run_server(
    main: Coroutine[Any, Any, None], name: str, *, wait_seconds: float = LEFTOVER_TASKS_WAIT_SECONDS
) -> None:
    """`run(main)` for a server process whose `main` returns once it has shut down gracefully.

    asyncio.run then cancels the tasks still left and waits for them without a limit: one that does not
    end when cancelled would keep the stopped process alive until it is killed. Here they get
    `wait_seconds`; any still running then is logged with its stack (a bug to fix) and the process
    exits, since everything it held was already stopped."""

    tune_collector_for_server()

    async def main_then_leftovers() -> None:
        try:
            await main
        finally:
            await _cancel_leftovers(wait_seconds)

    run(main_then_leftovers(), name)


def tune_collector_for_server() -> None:
    """Garbage collection for a long-running server process: fewer young collections, and the heap
    built while starting frozen once the process serves (server_ready)."""
    global _freeze_heap_when_ready
    gc.set_threshold(SERVER_GC_THRESHOLD, *gc.get_threshold()[1:])
    _freeze_heap_when_ready = True


def server_ready() -> None:
    """Said once a server process serves (by MeshServer). In a process started by `run_server`, what
    exists now (modules, ORM mappings, protobuf descriptors, settings, pools) lives as long as the
    process: it is moved out of the garbage collector's reach (gc.freeze), so that full collections,
    which otherwise walk every one of those objects (~170,000, 100+ ms each on a slow machine), walk
    only what was made since. Elsewhere (tests starting many meshes in one process) it does nothing."""
    global _freeze_heap_when_ready
    if _freeze_heap_when_ready:
        _freeze_heap_when_ready = False
        gc.collect()
        gc.freeze()


async def run_to_the_end(call: Awaitable[T], ended: Callable[[], None] | None = None) -> T:
    """Awaits `call` in a task of its own that goes on when the caller is cancelled (a gRPC client
    gone away or past its deadline): work is never stopped in the middle of a database transaction
    or a publish. Cancelling an SQLAlchemy operation midway makes it terminate its connection, and
    with aiosqlite that can wait forever, leaving SQLite's write lock held and the task with it.
    `ended` is called once the call has ended, whether its caller waited or not."""
    task = asyncio.ensure_future(call)

    def done(finished: asyncio.Future[T]) -> None:
        if ended is not None:
            ended()
        if not finished.cancelled():
            finished.exception()  # retrieved: no "never retrieved" warning for a caller gone

    task.add_done_callback(done)
    return await asyncio.shield(task)


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def time_out_after(seconds: float, future: asyncio.Future[Any]) -> asyncio.TimerHandle:
    """A timer failing `future` with TimeoutError after `seconds` unless it is done by then: the bound
    of one wait without the task and callbacks asyncio.wait_for / asyncio.timeout cost on a hot path.
    Cancel it once the wait is over."""
    return future.get_loop().call_later(seconds, _time_out, future)


async def _cancel_leftovers(wait_seconds: float) -> None:
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    if not leftovers:
        return
    _, stuck = await asyncio.wait(leftovers, timeout=wait_seconds)
    if not stuck:
        return
    for task in stuck:
        stack = io.StringIO()
        task.print_stack(file=stack)
        log.error(
            "a task did not end when cancelled at shutdown; exiting without it",
            extra={"task": task.get_name(), "stack": stack.getvalue()},
        )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the shutdown itself was complete: only the stuck task is left behind
