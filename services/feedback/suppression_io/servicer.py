"""gRPC surface of the suppression list jobs and the account's SuppressedReasons."""

from __future__ import annotations

from grpc import aio

from postmesh.common.auth import caller_account_id
from postmesh.common.protoutil import from_timestamp, timestamp
from postmesh.feedback.v1 import feedback_pb2 as pb
from services.feedback.suppression_io import jobs
from services.feedback.suppression_io.jobs import AccountSuppressionSettings, ExportJobs, ImportJobs
from services.feedback.suppression_io.models import SuppressionImportJob

_REASON_PREFIX = "SUPPRESSION_LIST_REASON_"


def _name(enum: type, value: int, prefix: str) -> str:
    """The enum value's name without its prefix; unknown numbers read as UNSPECIFIED."""
    try:
        return str(enum.Name(value)).removeprefix(prefix)  # type: ignore[attr-defined]
    except ValueError:
        return "UNSPECIFIED"


def _reason(value: int) -> str:
    return _name(pb.SuppressionListReason, value, _REASON_PREFIX)


def _status(name: str) -> pb.JobStatus.ValueType:
    return pb.JobStatus.Value("JOB_STATUS_" + name)


def _destination(action: str) -> pb.ImportDestination:
    return pb.ImportDestination(
        suppression_list_destination=pb.SuppressionListDestination(
            suppression_list_import_action=pb.SuppressionListImportAction.Value(
                "SUPPRESSION_LIST_IMPORT_ACTION_" + action
            )
        )
    )


def _summary(job: SuppressionImportJob) -> pb.ImportJobSummary:
    return pb.ImportJobSummary(
        job_id=job.id,
        import_destination=_destination(job.action),
        job_status=_status(job.status),
        created_timestamp=timestamp(job.created_at),
        processed_records_count=job.processed_count,
        failed_records_count=job.failed_count,
    )


class SuppressionJobRpcs:
    """Mixed into FeedbackServicer."""

    # Bound in FeedbackService.on_ready.
    imports: ImportJobs
    exports: ExportJobs
    suppression_settings: AccountSuppressionSettings

    async def CreateImportJob(
        self, request: pb.CreateImportJobRequest, context: aio.ServicerContext
    ) -> pb.CreateImportJobResponse:
        action = _name(
            pb.SuppressionListImportAction,
            request.import_destination.suppression_list_destination.suppression_list_import_action,
            "SUPPRESSION_LIST_IMPORT_ACTION_",
        )
        source = request.import_data_source
        data_format = _name(pb.DataFormat, source.data_format, "DATA_FORMAT_")
        job_id = await self.imports.create(caller_account_id(), action, data_format, source.data)
        return pb.CreateImportJobResponse(job_id=job_id)

    async def GetImportJob(
        self, request: pb.GetImportJobRequest, context: aio.ServicerContext
    ) -> pb.GetImportJobResponse:
        job = await self.imports.get(caller_account_id(), request.job_id)
        return pb.GetImportJobResponse(
            job_id=job.id,
            import_destination=_destination(job.action),
            data_format=pb.DataFormat.Value("DATA_FORMAT_" + job.data_format),
            job_status=_status(job.status),
            created_timestamp=timestamp(job.created_at),
            completed_timestamp=timestamp(job.completed_at),
            processed_records_count=job.processed_count,
            failed_records_count=job.failed_count,
            failure_info=pb.FailureInfo(
                error_message=job.error_message,
                failed_records=[
                    pb.FailedRecord(record_number=n, record=raw, error_message=error)
                    for n, raw, error in jobs.failed_records(job)
                ],
            ),
        )

    async def ListImportJobs(
        self, request: pb.ListImportJobsRequest, context: aio.ServicerContext
    ) -> pb.ListImportJobsResponse:
        rows, token = await self.imports.page(caller_account_id(), request.page_size, request.page_token)
        return pb.ListImportJobsResponse(import_jobs=[_summary(j) for j in rows], next_page_token=token)

    async def CreateExportJob(
        self, request: pb.CreateExportJobRequest, context: aio.ServicerContext
    ) -> pb.CreateExportJobResponse:
        source = request.export_data_source.suppression_list_data_source
        job_id = await self.exports.create(
            caller_account_id(),
            _name(pb.DataFormat, request.export_destination.data_format, "DATA_FORMAT_"),
            [_reason(r) for r in source.reasons],
            from_timestamp(source.start_date),
            from_timestamp(source.end_date),
        )
        return pb.CreateExportJobResponse(job_id=job_id)

    async def GetExportJob(
        self, request: pb.GetExportJobRequest, context: aio.ServicerContext
    ) -> pb.GetExportJobResponse:
        job = await self.exports.get(caller_account_id(), request.job_id)
        source = pb.SuppressionListDataSource(
            reasons=[pb.SuppressionListReason.Value(_REASON_PREFIX + r) for r in job.reasons.split(",") if r],
            start_date=timestamp(job.start_date),
            end_date=timestamp(job.end_date),
        )
        reply = pb.GetExportJobResponse(
            job_id=job.id,
            export_data_source=pb.ExportDataSource(suppression_list_data_source=source),
            export_destination=pb.ExportDestination(
                data_format=pb.DataFormat.Value("DATA_FORMAT_" + job.data_format)
            ),
            job_status=_status(job.status),
            created_timestamp=timestamp(job.created_at),
            completed_timestamp=timestamp(job.completed_at),
            exported_records_count=job.exported_count,
            error_message=job.error_message,
            total_bytes=len(job.data),
        )
        if job.status == jobs.COMPLETED:
            reply.data, reply.next_data_offset = jobs.chunk(job.data, request.data_offset)
            reply.data_offset = request.data_offset
        return reply

    async def PutAccountSuppressionAttributes(
        self, request: pb.PutAccountSuppressionAttributesRequest, context: aio.ServicerContext
    ) -> pb.PutAccountSuppressionAttributesResponse:
        await self.suppression_settings.put(
            caller_account_id(), [_reason(r) for r in request.suppressed_reasons]
        )
        return pb.PutAccountSuppressionAttributesResponse()

    async def GetAccountSuppressionAttributes(
        self, request: pb.GetAccountSuppressionAttributesRequest, context: aio.ServicerContext
    ) -> pb.GetAccountSuppressionAttributesResponse:
        reasons = await self.suppression_settings.reasons(caller_account_id())
        return pb.GetAccountSuppressionAttributesResponse(
            suppressed_reasons=[pb.SuppressionListReason.Value(_REASON_PREFIX + r) for r in sorted(reasons)]
        )
