"""A caller that goes away (a gRPC client's deadline, a client killed mid-call) does not stop the work
it started in the middle: `eventloop.run_to_the_end`, which the server's interceptor wraps around every
unary RPC. Cancelling SQLAlchemy inside a transaction terminates its aiosqlite connection, and that
can wait forever with SQLite's write lock held (seen in the fault test that kills a sender mid-burst:
quota's database locked for good); here, callers cancelled at every point of a real transaction."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import text

from postmesh.common import db
from postmesh.common.eventloop import run_to_the_end


async def test_work_goes_on_when_its_caller_is_cancelled_and_ended_is_called() -> None:
    steps: list[str] = []
    ended: list[bool] = []

    async def work() -> str:
        steps.append("started")
        await asyncio.sleep(0.05)
        steps.append("finished")
        return "done"

    caller = asyncio.ensure_future(run_to_the_end(work(), lambda: ended.append(True)))
    await asyncio.sleep(0.01)
    caller.cancel()
    await asyncio.sleep(0.1)
    assert caller.cancelled()
    assert steps == ["started", "finished"]
    assert ended == [True]
    # Answered as the work answers when the caller waits.
    assert await run_to_the_end(work()) == "done"


async def test_transactions_whose_callers_are_cancelled_midway_all_end_and_free_the_database(
    tmp_path: Path,
) -> None:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'cancelled.db'}")
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, value INTEGER)"))
        await connection.execute(text("INSERT INTO counter VALUES (1, 0)"))
    sessions = db.session_factory(engine)

    async def transaction() -> None:
        async with db.transaction(sessions) as session:
            await session.execute(text("UPDATE counter SET value = value + 1 WHERE id = 1"))
            for _ in range(20):
                await session.execute(text("SELECT sum(value) FROM counter"))
            await session.execute(text("UPDATE counter SET value = value + 1 WHERE id = 1"))

    callers = 60
    for n in range(callers):
        caller = asyncio.ensure_future(run_to_the_end(transaction()))
        await asyncio.sleep(0.05 * (n % 20) / 20)  # cancelled at every point of the transaction
        caller.cancel()
        if n % 3 == 0:
            await asyncio.sleep(0)
            caller.cancel()  # twice: a deadline and a disconnection
        try:
            await asyncio.wait_for(asyncio.shield(caller), 30)
        except asyncio.CancelledError:
            pass

    async def written() -> int:
        async with db.transaction(sessions) as session:
            await session.execute(text("UPDATE counter SET value = value + 0 WHERE id = 1"))
            return int((await session.execute(text("SELECT value FROM counter"))).scalar_one())

    # Every transaction ran to its end (two increments each), and the database takes writes at once.
    value = await asyncio.wait_for(written(), 10)
    deadline = asyncio.get_running_loop().time() + 10
    while value < 2 * callers and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
        value = await asyncio.wait_for(written(), 10)
    assert value == 2 * callers
    await engine.dispose()
