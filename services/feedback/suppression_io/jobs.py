"""Import and export jobs of the suppression list, and the account's SuppressedReasons (domain code
and storage: no gRPC here).

A job is stored first (an import with its file), then run by the service's job runner in the
background: CREATED -> PROCESSING -> COMPLETED (or FAILED when the file as a whole is unreadable).
Running a job again after a restart is harmless: an import's changes are upserts and deletes, and
its counts are written once at the end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
from collections.abc import Iterable, Sequence
from typing import TypeVar

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from postmesh.common.db import transaction
from postmesh.common.errors import InvalidArgument, NotFound
from postmesh.common.paging import keyset_page, split_page
from postmesh.common.service import Clock
from services.feedback.suppression import REASONS, SuppressionList
from services.feedback.suppression_io import files
from services.feedback.suppression_io.models import (
    AccountSuppressionAttributes,
    SuppressionExportJob,
    SuppressionImportJob,
)

log = logging.getLogger(__name__)

CREATED, PROCESSING, COMPLETED, FAILED = "CREATED", "PROCESSING", "COMPLETED", "FAILED"
MAX_FAILURES_KEPT = 1000
CHUNK_RECORDS = 2000
EXPORT_CHUNK_BYTES = 1 << 20
# Finished jobs (and exported files) are forgotten after this long.
JOB_RETENTION = dt.timedelta(days=7)


def new_job_id(now: dt.datetime) -> str:
    return f"{int(now.timestamp() * 1000):013x}{secrets.token_hex(8)}"


Job = TypeVar("Job", SuppressionImportJob, SuppressionExportJob)


async def _get(
    sessions: async_sessionmaker[AsyncSession], model: type[Job], account_id: str, job_id: str, what: str
) -> Job:
    async with sessions() as session:
        job = await session.get(model, job_id)
    if job is None or job.account_id != account_id:  # another account's job does not exist either
        raise NotFound(f"{what} {job_id} does not exist.")
    return job


async def _unfinished(sessions: async_sessionmaker[AsyncSession], model: type[Job]) -> list[str]:
    async with sessions() as session:
        rows = await session.scalars(
            select(model.id).where(model.status.in_([CREATED, PROCESSING])).order_by(model.id)
        )
        return list(rows.all())


async def _expire(sessions: async_sessionmaker[AsyncSession], model: type[Job], cutoff: dt.datetime) -> None:
    async with transaction(sessions) as session:
        await session.execute(
            delete(model).where(model.status.in_([COMPLETED, FAILED]), model.created_at < cutoff)
        )


class JobRunner:
    """Runs stored jobs one after another, in the background."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.imports: ImportJobs | None = None
        self.exports: ExportJobs | None = None

    def submit(self, kind: str, job_id: str) -> None:
        self._queue.put_nowait((kind, job_id))

    async def run_forever(self, *, resume: bool = True) -> None:
        assert self.imports is not None and self.exports is not None
        if resume:
            for job_id in await self.imports.unfinished():
                self.submit("import", job_id)
            for job_id in await self.exports.unfinished():
                self.submit("export", job_id)
        while True:
            kind, job_id = await self._queue.get()
            try:
                if kind == "import":
                    await self.imports.run(job_id)
                else:
                    await self.exports.run(job_id)
            except Exception:
                # The job stays unfinished and is run again at the next start.
                log.exception("suppression list job failed", extra={"job_id": job_id, "kind": kind})


class ImportJobs:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        suppression: SuppressionList,
        runner: JobRunner,
        *,
        max_bytes: int,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._suppression = suppression
        self._runner = runner
        self._max_bytes = max_bytes
        runner.imports = self

    async def create(self, account_id: str, action: str, data_format: str, data: bytes) -> str:
        if action not in (files.PUT, files.DELETE):
            raise InvalidArgument(
                "suppression_list_import_action must be PUT or DELETE.",
                field="import_destination.suppression_list_destination.suppression_list_import_action",
            )
        if data_format not in (files.CSV, files.JSON):
            raise InvalidArgument("data_format must be CSV or JSON.", field="import_data_source.data_format")
        if not data:
            raise InvalidArgument("The import file is empty.", field="import_data_source.data")
        if len(data) > self._max_bytes:
            raise InvalidArgument(
                f"The import file is {len(data)} bytes; at most {self._max_bytes} are accepted in one job "
                "(split it into several jobs).",
                field="import_data_source.data",
            )
        now = self._clock.now()
        job = SuppressionImportJob(
            id=new_job_id(now),
            account_id=account_id,
            action=action,
            data_format=data_format,
            status=CREATED,
            data=data,
            created_at=now,
            processed_count=0,
            failed_count=0,
            error_message="",
            failures="[]",
        )
        async with transaction(self._sessions) as session:
            session.add(job)
        self._runner.submit("import", job.id)
        return job.id

    async def get(self, account_id: str, job_id: str) -> SuppressionImportJob:
        return await _get(self._sessions, SuppressionImportJob, account_id, job_id, "Import job")

    async def page(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[Sequence[SuppressionImportJob], str]:
        query = select(SuppressionImportJob).where(SuppressionImportJob.account_id == account_id)
        statement, size = keyset_page(query, SuppressionImportJob.id, page_size, page_token)
        async with self._sessions() as session:
            rows = (await session.scalars(statement)).all()
        return split_page(rows, size, lambda r: r.id)

    async def unfinished(self) -> list[str]:
        return await _unfinished(self._sessions, SuppressionImportJob)

    async def run(self, job_id: str) -> None:
        async with transaction(self._sessions) as session:
            job = await session.get(SuppressionImportJob, job_id)
            if job is None or job.status not in (CREATED, PROCESSING):
                return
            job.status = PROCESSING
        processed = failed = 0
        failures: list[tuple[int, str, str]] = []
        error = ""
        try:
            batch: list[files.Record] = []
            for item in files.parse(job.data, job.data_format, job.action):
                if isinstance(item, files.Failure):
                    failed += 1
                    if len(failures) < MAX_FAILURES_KEPT:
                        failures.append((item.number, item.raw, item.error))
                    continue
                processed += 1
                batch.append(item)
                if len(batch) >= CHUNK_RECORDS:
                    await self._apply(job, batch)
                    batch = []
                    await asyncio.sleep(0)  # a long file does not hold the loop
            await self._apply(job, batch)
        except files.UnreadableFile as exc:
            error = str(exc)
        async with transaction(self._sessions) as session:
            await session.execute(
                update(SuppressionImportJob)
                .where(SuppressionImportJob.id == job_id)
                .values(
                    status=FAILED if error else COMPLETED,
                    completed_at=self._clock.now(),
                    processed_count=processed,
                    failed_count=failed,
                    error_message=error,
                    failures=json.dumps(failures),
                    data=b"",
                )
            )

    async def _apply(self, job: SuppressionImportJob, records: list[files.Record]) -> None:
        if not records:
            return
        if job.action == files.PUT:
            await self._suppression.put_many(job.account_id, [(r.address, r.reason) for r in records])
        else:
            await self._suppression.delete_many(job.account_id, [r.address for r in records])

    async def expire(self) -> None:
        await _expire(self._sessions, SuppressionImportJob, self._clock.now() - JOB_RETENTION)


def failed_records(job: SuppressionImportJob) -> list[tuple[int, str, str]]:
    return [(int(n), str(raw), str(error)) for n, raw, error in json.loads(job.failures or "[]")]


class ExportJobs:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        clock: Clock,
        suppression: SuppressionList,
        runner: JobRunner,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._suppression = suppression
        self._runner = runner
        runner.exports = self

    async def create(
        self,
        account_id: str,
        data_format: str,
        reasons: Iterable[str],
        start: dt.datetime | None,
        end: dt.datetime | None,
    ) -> str:
        if data_format not in (files.CSV, files.JSON):
            raise InvalidArgument("data_format must be CSV or JSON.", field="export_destination.data_format")
        wanted = sorted(set(reasons))
        if any(r not in REASONS for r in wanted):
            raise InvalidArgument(
                "reasons must be BOUNCE or COMPLAINT.",
                field="export_data_source.suppression_list_data_source.reasons",
            )
        if start is not None and end is not None and end <= start:
            raise InvalidArgument(
                "end_date must be after start_date.",
                field="export_data_source.suppression_list_data_source.end_date",
            )
        now = self._clock.now()
        job = SuppressionExportJob(
            id=new_job_id(now),
            account_id=account_id,
            data_format=data_format,
            reasons=",".join(wanted),
            start_date=start,
            end_date=end,
            status=CREATED,
            created_at=now,
            exported_count=0,
            error_message="",
            data=b"",
        )
        async with transaction(self._sessions) as session:
            session.add(job)
        self._runner.submit("export", job.id)
        return job.id

    async def get(self, account_id: str, job_id: str) -> SuppressionExportJob:
        return await _get(self._sessions, SuppressionExportJob, account_id, job_id, "Export job")

    async def unfinished(self) -> list[str]:
        return await _unfinished(self._sessions, SuppressionExportJob)

    async def run(self, job_id: str) -> None:
        async with transaction(self._sessions) as session:
            job = await session.get(SuppressionExportJob, job_id)
            if job is None or job.status not in (CREATED, PROCESSING):
                return
            job.status = PROCESSING
        reasons = [r for r in job.reasons.split(",") if r]
        rows: list[files.ExportRow] = []
        token = ""
        while True:
            page, token = await self._suppression.list(
                job.account_id, reasons, job.start_date, job.end_date, 1000, token
            )
            rows += [files.ExportRow(r.email_address, r.reason, r.updated_at) for r in page]
            if not token:
                break
        data = files.render(rows, job.data_format)
        async with transaction(self._sessions) as session:
            await session.execute(
                update(SuppressionExportJob)
                .where(SuppressionExportJob.id == job_id)
                .values(status=COMPLETED, completed_at=self._clock.now(), exported_count=len(rows), data=data)
            )

    async def expire(self) -> None:
        await _expire(self._sessions, SuppressionExportJob, self._clock.now() - JOB_RETENTION)


def chunk(data: bytes, offset: int) -> tuple[bytes, int]:
    """Up to EXPORT_CHUNK_BYTES of an exported file from `offset`, and where the next chunk starts."""
    if offset < 0 or offset > len(data):
        raise InvalidArgument(f"data_offset must be between 0 and {len(data)}.", field="data_offset")
    part = data[offset : offset + EXPORT_CHUNK_BYTES]
    return part, offset + len(part)


class AccountSuppressionSettings:
    """Which reasons suppress automatically, per account; the operator's default until it is set."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], clock: Clock, default: frozenset[str]
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._default = default

    async def reasons(self, account_id: str) -> frozenset[str]:
        async with self._sessions() as session:
            row = await session.get(AccountSuppressionAttributes, account_id)
        if row is None:
            return self._default
        return frozenset(r for r in row.suppressed_reasons.split(",") if r)

    async def put(self, account_id: str, reasons: Iterable[str]) -> None:
        wanted = sorted(set(reasons))
        if any(r not in REASONS for r in wanted):
            raise InvalidArgument(
                "suppressed_reasons must be BOUNCE or COMPLAINT.", field="suppressed_reasons"
            )
        async with transaction(self._sessions) as session:
            row = await session.get(AccountSuppressionAttributes, account_id)
            if row is None:
                row = AccountSuppressionAttributes(account_id=account_id)
                session.add(row)
            row.suppressed_reasons = ",".join(wanted)
            row.updated_at = self._clock.now()
