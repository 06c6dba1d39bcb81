"""WatchScoringJob: ordered events that end at the final state, replay, and stream limits."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from o2u_server.jobs.events import EventHub
from tests.server_testing import SLOW_CONFIG, RunningServer, call_error, create_job, wait_for_job

Stub = scoring_pb2_grpc.ScoringServiceStub


def _watch(stub: Stub, job_id: str, after: int = 0) -> list[pb.JobEvent]:
    request = pb.WatchScoringJobRequest(job_id=job_id, after_sequence=after)
    return [response.event for response in stub.WatchScoringJob(request, timeout=120)]


def test_watch_streams_every_event_in_order_until_the_end(stub: Stub, digits_uri: str) -> None:
    job = create_job(stub, digits_uri)
    events = _watch(stub, job.job_id)  # returns only because the stream ends at SUCCEEDED

    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    assert (events[0].type, events[0].state) == (pb.JOB_EVENT_TYPE_STATE_CHANGED, pb.JOB_STATE_QUEUED)
    assert (events[1].type, events[1].state) == (pb.JOB_EVENT_TYPE_STATE_CHANGED, pb.JOB_STATE_RUNNING)
    assert (events[-1].type, events[-1].state) == (pb.JOB_EVENT_TYPE_STATE_CHANGED, pb.JOB_STATE_SUCCEEDED)
    progress = [event.progress for event in events if event.type == pb.JOB_EVENT_TYPE_PROGRESS]
    loading = progress.pop(0)  # what loading read: the one .npz file
    assert (loading.stage, loading.files_read) == (pb.STAGE_LOADING, 1)
    assert loading.bytes_read > 0
    stages = [p.stage for p in progress]
    # TINY_CONFIG: 2 pretraining epochs, then one cycle of 2 epochs, then ranking.
    assert stages == [pb.STAGE_PRETRAINING] * 2 + [pb.STAGE_CYCLIC] * 2 + [pb.STAGE_RANKING]
    assert [p.epoch for p in progress[:4]] == [1, 2, 1, 2]
    assert all(p.mean_loss > 0 and p.samples_per_second > 0 for p in progress[:4])
    fractions = [p.fraction_done for p in progress]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    times = [event.event_time.ToNanoseconds() for event in events]
    assert times == sorted(times)

    final = stub.GetScoringJob(pb.GetScoringJobRequest(job_id=job.job_id)).job
    assert final.progress.stage == pb.STAGE_RANKING


def test_watch_replays_after_a_sequence(stub: Stub, finished_job: pb.ScoringJob) -> None:
    everything = _watch(stub, finished_job.job_id)
    tail = _watch(stub, finished_job.job_id, after=3)
    assert tail == everything[3:]
    assert _watch(stub, finished_job.job_id, after=everything[-1].sequence) == []
    assert _watch(stub, finished_job.job_id, after=10_000) == []
    error = call_error(lambda: _watch(stub, finished_job.job_id, after=-1))
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["after_sequence"])


def test_closing_a_watch_does_not_cancel_the_job(stub: Stub, digits_uri: str) -> None:
    job = create_job(stub, digits_uri)
    stream = stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id), timeout=60)
    first = next(stream)
    stream.cancel()
    assert first.event.sequence == 1
    assert wait_for_job(stub, job.job_id).state == pb.JOB_STATE_SUCCEEDED


def test_a_watch_joined_mid_run_misses_nothing(stub: Stub, digits_uri: str) -> None:
    job = create_job(stub, digits_uri)
    wait_for_job(stub, job.job_id, states=(pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED))
    late = _watch(stub, job.job_id, after=1)
    assert [event.sequence for event in late] == list(range(2, len(late) + 2))
    assert late[-1].state == pb.JOB_STATE_SUCCEEDED


def test_too_many_watch_streams(start_server: Callable[..., RunningServer], digits_uri: str) -> None:
    running = start_server(max_watch_streams=1)
    with running.channel() as channel:
        stub = Stub(channel)
        job = create_job(stub, digits_uri, config=SLOW_CONFIG)
        stream = stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id), timeout=60)
        next(stream)
        refused = call_error(lambda: _watch(stub, job.job_id))
        assert (refused.code, refused.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_WATCH_STREAMS",
        )
        assert refused.retry_delay_seconds is not None
        stream.cancel()  # frees the slot once the server sees the cancellation
        deadline = time.monotonic() + 10
        while "o2u_watch_streams 1.0" in running.scrape():
            assert time.monotonic() < deadline, "the closed stream still counts"
            time.sleep(0.05)
        stub.CancelScoringJob(pb.CancelScoringJobRequest(job_id=job.job_id))
        events = _watch(stub, job.job_id)
        assert events[-1].state == pb.JOB_STATE_CANCELLED
        assert "o2u_watch_streams 0.0" in running.scrape()


def test_a_watch_of_a_job_deleted_before_it_saw_the_end_ends_in_not_found(
    start_server: Callable[..., RunningServer], digits_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch that gets no live events (another replica ran the job and its notices were lost)
    finds the job's events by polling the store; if the job was deleted first, the poll finds
    nothing, and the watch must end instead of holding its stream slot for good."""
    monkeypatch.setattr(EventHub, "publish", lambda self, event: None)
    monkeypatch.setattr(EventHub, "_notice", lambda self, job_id, sequence: None)
    running = start_server()
    with running.channel() as channel:
        stub = Stub(channel)
        job = create_job(stub, digits_uri)
        stream = stub.WatchScoringJob(pb.WatchScoringJobRequest(job_id=job.job_id), timeout=30)
        assert next(stream).event.sequence == 1  # replayed: the watch now waits on its polls
        wait_for_job(stub, job.job_id)
        stub.DeleteScoringJob(pb.DeleteScoringJobRequest(job_id=job.job_id))
        try:
            ending: object = [response.event for response in stream][-1].state
        except grpc.RpcError as error:
            ending = error.code()
        # NOT_FOUND; or, when a poll landed between the end and the delete, the final event.
        assert ending in (grpc.StatusCode.NOT_FOUND, pb.JOB_STATE_SUCCEEDED), ending
