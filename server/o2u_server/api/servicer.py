"""The o2u.v1.ScoringService servicer: each RPC converts the request, awaits the job manager and
converts the result back. Errors are raised, never set here: the interceptor maps them to status
codes with google.rpc details (see `o2u_server.api.status`).

Error codes callers should expect, per RPC (every RPC can also return UNAVAILABLE while the server
starts or drains, and UNAUTHENTICATED when a bearer token is configured):
- CreateScoringJob: INVALID_ARGUMENT (malformed URI, request_id or config value, naming the field),
  PERMISSION_DENIED (path outside the data roots, bucket not allowed), NOT_FOUND (the dataset or
  initial weights do not exist at submission), ALREADY_EXISTS (request_id reused with a different
  request), RESOURCE_EXHAUSTED (queue full, with RetryInfo; or the principal's quota, with
  QuotaFailure). Problems found only when the job loads
  its data (an object deleted after submission, a malformed file, a limit) fail the job instead:
  ScoringJob.error.code carries the same canonical code (e.g. 5 = NOT_FOUND).
- Get/Cancel/Delete/Watch and the result RPCs: INVALID_ARGUMENT (malformed job_id), NOT_FOUND (also
  for another principal's job, with the same message as a missing id).
- DeleteScoringJob, ListNoiseScores, GetDatasetSummary, ExportNoiseScores: FAILED_PRECONDITION
  while the job is unfinished (or, for results, did not succeed).
- List RPCs: INVALID_ARGUMENT for a negative page_size or a page_token from another request.
- WatchScoringJob: RESOURCE_EXHAUSTED (too many streams, with RetryInfo).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from typing_extensions import override

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server.api import converters
from o2u_server.jobs.manager import JobManager

__all__ = ["ScoringServicer"]

Context = grpc.aio.ServicerContext[Any, Any]


class ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self._manager = manager

    @override
    async def CreateScoringJob(
        self, request: pb.CreateScoringJobRequest, context: Context
    ) -> pb.CreateScoringJobResponse:
        job = await self._manager.create(converters.job_spec(request))
        return pb.CreateScoringJobResponse(job=converters.job_message(job))

    @override
    async def GetScoringJob(
        self, request: pb.GetScoringJobRequest, context: Context
    ) -> pb.GetScoringJobResponse:
        job = await self._manager.get(request.job_id)
        return pb.GetScoringJobResponse(job=converters.job_message(job))

    @override
    async def ListScoringJobs(
        self, request: pb.ListScoringJobsRequest, context: Context
    ) -> pb.ListScoringJobsResponse:
        jobs, next_page_token = await self._manager.list_jobs(
            request.page_size, request.page_token, converters.job_state(request.state), request.owner
        )
        return pb.ListScoringJobsResponse(
            jobs=[converters.job_message(job) for job in jobs], next_page_token=next_page_token
        )

    @override
    async def CancelScoringJob(
        self, request: pb.CancelScoringJobRequest, context: Context
    ) -> pb.CancelScoringJobResponse:
        job = await self._manager.cancel(request.job_id)
        return pb.CancelScoringJobResponse(job=converters.job_message(job))

    @override
    async def DeleteScoringJob(
        self, request: pb.DeleteScoringJobRequest, context: Context
    ) -> pb.DeleteScoringJobResponse:
        await self._manager.delete(request.job_id)
        return pb.DeleteScoringJobResponse()

    @override
    async def WatchScoringJob(
        self, request: pb.WatchScoringJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchScoringJobResponse]:
        async for event in self._manager.watch(request.job_id, request.after_sequence):
            yield pb.WatchScoringJobResponse(event=converters.event_message(event))

    @override
    async def ListNoiseScores(
        self, request: pb.ListNoiseScoresRequest, context: Context
    ) -> pb.ListNoiseScoresResponse:
        page = await self._manager.list_scores(
            request.job_id, request.page_size, request.page_token, converters.score_filter(request)
        )
        return pb.ListNoiseScoresResponse(
            noise_scores=[converters.score_message(row) for row in page.scores],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    @override
    async def GetDatasetSummary(
        self, request: pb.GetDatasetSummaryRequest, context: Context
    ) -> pb.GetDatasetSummaryResponse:
        summary = await self._manager.summary(request.job_id)
        return pb.GetDatasetSummaryResponse(summary=converters.summary_message(summary))

    @override
    async def ExportNoiseScores(
        self, request: pb.ExportNoiseScoresRequest, context: Context
    ) -> pb.ExportNoiseScoresResponse:
        rows, size = await self._manager.export(
            request.job_id,
            request.destination_uri,
            converters.export_format(request.format),
            request.only_suspected,
        )
        return pb.ExportNoiseScoresResponse(
            destination_uri=request.destination_uri, rows_written=rows, bytes_written=size
        )
