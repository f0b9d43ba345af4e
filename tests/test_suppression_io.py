"""Suppression list import and export jobs and per-account SuppressedReasons: the file parser under
hostile input (hypothesis), the jobs on SQLite and PostgreSQL, and the RPCs and CLI on a real mesh."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postmesh.cli.main import main
from postmesh.client import Client
from postmesh.common import db
from postmesh.common.addresses import normalize_address
from postmesh.common.bus import EventPublisher, new_event
from postmesh.common.errors import InvalidArgument, NotFound
from postmesh.events.v1 import events_pb2 as ev
from postmesh.feedback.v1 import feedback_pb2 as pb
from postmesh.testing import MeshThread
from services.feedback.models import Base
from services.feedback.suppression import SuppressionList
from services.feedback.suppression_io import files, jobs
from services.feedback.suppression_io.jobs import (
    AccountSuppressionSettings,
    ExportJobs,
    ImportJobs,
    JobRunner,
)
from tests.sending_helpers import own_nats_server

T0 = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _valid(address: str) -> bool:
    try:
        normalize_address(address.strip())
    except InvalidArgument:
        return False
    return bool(address.strip())


# --- The parser: every record ends as a Record or a Failure with a reason, never an exception.

records = st.lists(
    st.tuples(
        st.one_of(st.emails(), st.text(max_size=40)),
        st.one_of(st.sampled_from(["BOUNCE", "complaint", "Bounce"]), st.text(max_size=12)),
    ),
    max_size=30,
)


@given(records)
@settings(max_examples=150, deadline=None)
def test_json_lines_each_record_accepted_or_failed_with_a_reason(entries: list[tuple[str, str]]) -> None:
    data = "\n".join(json.dumps({"emailAddress": a, "reason": r}) for a, r in entries).encode()
    parsed = list(files.parse(data, files.JSON, files.PUT))
    assert len(parsed) == len(entries)
    for (address, reason), item in zip(entries, parsed, strict=True):
        good = _valid(address) and reason.strip().upper() in files.REASONS
        assert isinstance(item, files.Record) == good, (address, reason, item)
        if isinstance(item, files.Failure):
            assert item.error


@given(records)
@settings(max_examples=150, deadline=None)
def test_csv_records_accepted_or_failed_with_a_reason(entries: list[tuple[str, str]]) -> None:
    out = io.StringIO()
    # Quoted, so a lone CR inside an address stays in its field (unquoted, it is a line break).
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(["emailAddress", "reason"])
    kept = [(a, r) for a, r in entries if (a.strip() or r.strip())]
    for address, reason in kept:
        writer.writerow([address, reason])
    parsed = list(files.parse(out.getvalue().encode(), files.CSV, files.PUT))
    assert len(parsed) == len(kept)
    for (address, reason), item in zip(kept, parsed, strict=True):
        good = _valid(address) and reason.strip().upper() in files.REASONS
        assert isinstance(item, files.Record) == good, (address, reason, item)


@given(
    st.binary(max_size=2000),
    st.sampled_from([files.CSV, files.JSON]),
    st.sampled_from([files.PUT, files.DELETE]),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_never_crash_the_parser(data: bytes, data_format: str, action: str) -> None:
    try:
        parsed = list(files.parse(data, data_format, action))
    except files.UnreadableFile as exc:
        assert str(exc)
        return
    for item in parsed:
        assert isinstance(item, files.Record) or (isinstance(item, files.Failure) and item.error)


def test_malformed_shapes_are_failures_with_reasons() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    data = "\n".join(
        ['{"emailAddress": "ok@example.test", "reason": "BOUNCE"}', "{not json", "42", deep, "[]"]
    )
    parsed = list(files.parse(data.encode(), files.JSON, files.PUT))
    assert isinstance(parsed[0], files.Record)
    assert [type(p).__name__ for p in parsed[1:]] == ["Failure"] * 4
    with pytest.raises(files.UnreadableFile):
        list(files.parse(b'[{"emailAddress": "a@example.test"', files.JSON, files.PUT))
    with pytest.raises(files.UnreadableFile):
        list(files.parse(b"\xff\xfe garbage", files.CSV, files.PUT))
    huge_field = b'"' + b"x" * 200_000 + b'"\nok@example.test,BOUNCE\n'
    parsed = list(files.parse(huge_field, files.CSV, files.PUT))
    assert isinstance(parsed[0], files.Failure) and "CSV" in parsed[0].error
    assert isinstance(parsed[-1], files.Record) and parsed[-1].address == "ok@example.test"
    # DELETE needs no reason; a header may name the columns in any order.
    parsed = list(files.parse(b"reason,emailAddress\n,gone@example.test\n", files.CSV, files.DELETE))
    assert parsed == [files.Record(2, "gone@example.test", "")]


def test_export_files_read_back_as_imports() -> None:
    rows = [
        files.ExportRow("a@example.test", "BOUNCE", T0),
        files.ExportRow("b,c@example.test", "COMPLAINT", T0),
    ]
    for data_format in (files.CSV, files.JSON):
        data = files.render(rows, data_format)
        back = list(files.parse(data, data_format, files.PUT))
        assert [(r.address, r.reason) for r in back if isinstance(r, files.Record)] == [
            ("a@example.test", "BOUNCE")
        ]  # "b,c@" is no address postmesh accepts: it fails, it does not split
    data = b"x" * (jobs.EXPORT_CHUNK_BYTES * 2 + 5)
    first, offset = jobs.chunk(data, 0)
    second, offset = jobs.chunk(data, offset)
    third, offset = jobs.chunk(data, offset)
    assert first + second + third == data and offset == len(data) and len(third) == 5
    with pytest.raises(InvalidArgument):
        jobs.chunk(data, len(data) + 1)


# --- The jobs on real databases.


class Clock:
    value = T0

    def now(self) -> dt.datetime:
        return self.value


@pytest.fixture
async def parts(
    database_url: str,
) -> AsyncIterator[tuple[ImportJobs, ExportJobs, SuppressionList, JobRunner]]:
    engine = db.create_engine(database_url)
    migrations = Path(__file__).parent.parent / "services" / "feedback" / "migrations"
    await db.migrate(engine, migrations, "alembic_version_feedback", Base.metadata)
    sessions = db.session_factory(engine)
    suppression = SuppressionList(sessions, Clock())
    runner = JobRunner()
    imports = ImportJobs(sessions, Clock(), suppression, runner, max_bytes=100_000)
    exports = ExportJobs(sessions, Clock(), suppression, runner)
    yield imports, exports, suppression, runner
    await engine.dispose()


async def test_import_then_export_on_the_database(
    parts: tuple[ImportJobs, ExportJobs, SuppressionList, JobRunner],
) -> None:
    imports, exports, suppression, _ = parts
    lines = ["emailAddress,reason"] + [f"user{i}@example.test,BOUNCE" for i in range(2500)]
    lines += ["USER1@example.test,complaint", "not-an-address,BOUNCE", "x@example.test,SPAM", ""]
    job_id = await imports.create("acct-a", files.PUT, files.CSV, "\n".join(lines).encode())
    assert (await imports.get("acct-a", job_id)).status == jobs.CREATED
    await imports.run(job_id)
    job = await imports.get("acct-a", job_id)
    assert (job.status, job.processed_count, job.failed_count) == (jobs.COMPLETED, 2501, 2)
    assert [n for n, _, _ in jobs.failed_records(job)] == [2503, 2504]
    assert job.data == b""  # the file is not kept once done
    # The later record of an address wins.
    assert (await suppression.get("acct-a", "user1@example.test")).reason == "COMPLAINT"
    with pytest.raises(NotFound):
        await imports.get("acct-b", job_id)
    with pytest.raises(NotFound):
        await suppression.get("acct-b", "user1@example.test")

    export_id = await exports.create("acct-a", files.JSON, ["COMPLAINT"], None, None)
    await exports.run(export_id)
    export = await exports.get("acct-a", export_id)
    assert export.exported_count == 1 and json.loads(export.data)["emailAddress"] == "USER1@example.test"

    delete_id = await imports.create(
        "acct-a", files.DELETE, files.JSON, b'{"emailAddress": "user2@example.test"}'
    )
    await imports.run(delete_id)
    with pytest.raises(NotFound):
        await suppression.get("acct-a", "user2@example.test")

    with pytest.raises(InvalidArgument):
        await imports.create("acct-a", files.PUT, files.CSV, b"x" * 100_001)
    with pytest.raises(InvalidArgument):
        await imports.create("acct-a", "UNSPECIFIED", files.CSV, b"a@example.test,BOUNCE")
    with pytest.raises(InvalidArgument):
        await exports.create("acct-a", files.CSV, [], T0, T0 - dt.timedelta(days=1))
    listed, _ = await imports.page("acct-a", 0, "")
    assert [j.id for j in listed] == sorted([job_id, delete_id])
    # Unfinished jobs are found again at start-up, and running a job twice changes nothing.
    again = await imports.create("acct-a", files.PUT, files.CSV, b"late@example.test,BOUNCE")
    assert await imports.unfinished() == [again]
    await imports.run(again)
    await imports.run(again)
    assert (await imports.get("acct-a", again)).processed_count == 1
    # Finished jobs are forgotten after JOB_RETENTION; the suppressions they made stay.
    Clock.value = T0 + jobs.JOB_RETENTION + dt.timedelta(seconds=1)
    try:
        await imports.expire()
        await exports.expire()
    finally:
        Clock.value = T0
    with pytest.raises(NotFound):
        await imports.get("acct-a", again)
    with pytest.raises(NotFound):
        await exports.get("acct-a", export_id)
    assert (await suppression.get("acct-a", "late@example.test")).reason == "BOUNCE"


async def test_account_suppressed_reasons(database_url: str) -> None:
    engine = db.create_engine(database_url)
    migrations = Path(__file__).parent.parent / "services" / "feedback" / "migrations"
    await db.migrate(engine, migrations, "alembic_version_feedback", Base.metadata)
    store = AccountSuppressionSettings(
        db.session_factory(engine), Clock(), frozenset({"BOUNCE", "COMPLAINT"})
    )
    try:
        assert await store.reasons("acct") == {"BOUNCE", "COMPLAINT"}
        await store.put("acct", ["COMPLAINT"])
        assert await store.reasons("acct") == {"COMPLAINT"}
        await store.put("acct", [])
        assert await store.reasons("acct") == frozenset()
        assert await store.reasons("other") == {"BOUNCE", "COMPLAINT"}
        with pytest.raises(InvalidArgument):
            await store.put("acct", ["UNSPECIFIED"])
    finally:
        await engine.dispose()


# --- Through the mesh.


def _import_request(
    data: bytes, data_format: pb.DataFormat.ValueType = pb.DATA_FORMAT_CSV
) -> pb.CreateImportJobRequest:
    return pb.CreateImportJobRequest(
        import_destination=pb.ImportDestination(
            suppression_list_destination=pb.SuppressionListDestination(
                suppression_list_import_action=pb.SUPPRESSION_LIST_IMPORT_ACTION_PUT
            )
        ),
        import_data_source=pb.ImportDataSource(data_format=data_format, data=data),
    )


def _finished(client: Client, job_id: str) -> pb.GetImportJobResponse:
    deadline = time.monotonic() + 60
    while True:
        job = client.feedback.GetImportJob(pb.GetImportJobRequest(job_id=job_id))
        if job.job_status in (pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED):
            return job
        assert time.monotonic() < deadline, "import job never finished"
        time.sleep(0.2)


@given(
    st.binary(max_size=3000) | st.text(max_size=1500).map(str.encode),
    st.sampled_from([pb.DATA_FORMAT_CSV, pb.DATA_FORMAT_JSON]),
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_hostile_import_files_through_the_mesh(
    shared_mesh: tuple[MeshThread, str], data: bytes, fmt: int
) -> None:
    mesh, key = shared_mesh
    with mesh.client(key) as client:
        try:
            job_id = client.feedback.CreateImportJob(
                _import_request(data, pb.DataFormat.ValueType(fmt))
            ).job_id
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            return
        job = _finished(client, job_id)
        if job.job_status == pb.JOB_STATUS_FAILED:
            assert job.failure_info.error_message
        for failed in job.failure_info.failed_records:
            assert failed.error_message and failed.record_number >= 1


@pytest.fixture(scope="module")
def shared_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshThread, str]]:
    """One mesh for every hypothesis example, on a nats-server of its own: alive beside other tests'
    meshes, it must not share their durable consumers."""
    with own_nats_server(tmp_path_factory.mktemp("suppression-nats")) as url:
        mesh = MeshThread(nats_url=url, data_dir=tmp_path_factory.mktemp("suppression-mesh")).start()
        try:
            yield mesh, mesh.create_account()[1]
        finally:
            mesh.stop()


def test_import_export_and_reasons_through_rpcs_and_cli(
    mesh: MeshThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    account_id, key = mesh.create_account()
    _, other_key = mesh.create_account("other")
    monkeypatch.setenv("POSTMESH_ENDPOINT", mesh.address)
    monkeypatch.setenv("POSTMESH_API_KEY", key)
    source = tmp_path / "list.csv"
    source.write_text("emailAddress,reason\na@example.test,BOUNCE\nb@example.test,COMPLAINT\nnope,BOUNCE\n")
    assert main(["suppression", "import", str(source)]) == 0
    out = capsys.readouterr().out
    assert "COMPLETED" in out and "processed: 2  failed: 1" in out and "nope" in out

    with mesh.client(key) as client, mesh.client(other_key) as other:
        jobs_listed = client.feedback.ListImportJobs(pb.ListImportJobsRequest()).import_jobs
        assert len(jobs_listed) == 1 and jobs_listed[0].processed_records_count == 2
        assert not other.feedback.ListImportJobs(pb.ListImportJobsRequest()).import_jobs
        with pytest.raises(grpc.RpcError) as excinfo:
            other.feedback.GetImportJob(pb.GetImportJobRequest(job_id=jobs_listed[0].job_id))
        assert excinfo.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as excinfo:
            client.feedback.CreateImportJob(_import_request(b"x" * (16 * 1024 * 1024 + 1)))
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as excinfo:
            client.feedback.CreateImportJob(
                pb.CreateImportJobRequest(import_data_source=pb.ImportDataSource(data=b"a"))
            )
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    out_file = tmp_path / "bounces.json"
    assert (
        main(["suppression", "export", "--reasons", "BOUNCE", "--format", "json", "--out", str(out_file)])
        == 0
    )
    exported = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [e["emailAddress"] for e in exported] == ["a@example.test"]
    capsys.readouterr()
    assert main(["suppression", "export"]) == 0
    csv_lines = capsys.readouterr().out.splitlines()
    assert csv_lines[0] == "emailAddress,reason,lastUpdateTime"
    assert [line.split(",")[:2] for line in csv_lines[1:]] == [
        ["a@example.test", "BOUNCE"],
        ["b@example.test", "COMPLAINT"],
    ]

    # The other account imports what this one exported: a team moving its list along.
    monkeypatch.setenv("POSTMESH_API_KEY", other_key)
    assert main(["suppression", "import", str(out_file)]) == 0
    capsys.readouterr()
    assert main(["suppression", "list"]) == 0
    assert "a@example.test" in capsys.readouterr().out
    assert main(["suppression", "put", "c@example.test", "complaint"]) == 0
    assert main(["suppression", "delete", "a@example.test"]) == 0
    capsys.readouterr()
    assert main(["suppression", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["suppressed_destination_summaries"]
    assert [(d["email_address"], d["reason"]) for d in listed] == [
        ("c@example.test", "SUPPRESSION_LIST_REASON_COMPLAINT")
    ]

    # Per-account reasons: only complaints suppress for this account now.
    monkeypatch.setenv("POSTMESH_API_KEY", key)
    assert main(["suppression", "reasons", "COMPLAINT"]) == 0
    assert "suppressed reasons: COMPLAINT" in capsys.readouterr().out
    assert mesh.server is not None and mesh.server.nats is not None
    publisher = EventPublisher(mesh.server.nats.jetstream())

    def event(kind: int, address: str) -> ev.Event:
        email = ev.EmailEvent(event_type=kind, mail=ev.Mail(message_id="m"))  # type: ignore[arg-type]
        if kind == ev.EMAIL_EVENT_TYPE_BOUNCE:
            email.bounce.bounce_type = ev.BOUNCE_TYPE_PERMANENT
            email.bounce.bounced_recipients.add(email_address=address)
        else:
            email.complaint.complained_recipients.add(email_address=address)
        return new_event(account_id, email=email)

    for e in (
        event(ev.EMAIL_EVENT_TYPE_BOUNCE, "hard@example.test"),
        event(ev.EMAIL_EVENT_TYPE_COMPLAINT, "angry@example.test"),
    ):
        mesh.run(publisher.publish(e))
    with mesh.client(key) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.feedback.GetSuppressedDestination(
                    pb.GetSuppressedDestinationRequest(email_address="angry@example.test")
                )
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert time.monotonic() < deadline, "the complaint was never suppressed"
            time.sleep(0.2)
        # Handled in order: the bounce before it was seen, and not suppressed.
        with pytest.raises(grpc.RpcError):
            client.feedback.GetSuppressedDestination(
                pb.GetSuppressedDestinationRequest(email_address="hard@example.test")
            )
        with pytest.raises(grpc.RpcError) as excinfo:
            client.feedback.PutAccountSuppressionAttributes(
                pb.PutAccountSuppressionAttributesRequest(
                    suppressed_reasons=[pb.SUPPRESSION_LIST_REASON_UNSPECIFIED]
                )
            )
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
