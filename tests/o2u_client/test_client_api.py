"""Client round trips against a real server: submit, watch, wait, paged scores, summary, export,
idempotent creation, listing, cancel and delete."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from o2u_client import Client, EventType, Job, JobState, NotFoundError, Stage
from tests.server_testing import DIGITS_SAMPLES as NUM_SAMPLES
from tests.server_testing import SLOW_CONFIG, TINY_CONFIG, RunningServer

NUM_CLASSES = 10


def test_submit_watch_wait_round_trip(client: Client, dataset_uri: str) -> None:
    job = client.submit(dataset_uri, config=TINY_CONFIG, display_name="round trip")
    assert job.job_id
    assert job.state in (JobState.QUEUED, JobState.RUNNING)
    assert job.display_name == "round trip"
    assert job.dataset_uri == dataset_uri
    assert job.config["model"] == "mlp"
    assert job.config["num_cycles"] == 1
    assert job.raw.job_id == job.job_id

    events = list(client.watch(job.job_id))
    sequences = [event.sequence for event in events]
    assert sequences == list(range(1, len(events) + 1)), "events must arrive in order, without gaps"
    assert events[-1].state == JobState.SUCCEEDED
    assert events[-1].type == EventType.STATE_CHANGED
    assert JobState.RUNNING in {event.state for event in events}
    progress = [event.progress for event in events if event.type == EventType.PROGRESS and event.progress]
    assert {p.stage for p in progress} >= {Stage.PRETRAINING, Stage.CYCLIC}
    fractions = [p.fraction_done for p in progress]
    assert fractions == sorted(fractions)
    training = [p for p in progress if p.stage in (Stage.PRETRAINING, Stage.CYCLIC)]
    assert all(p.epochs_total >= p.epoch >= 1 for p in training)
    assert [p.epoch for p in training if p.stage == Stage.CYCLIC] == [1, 2]

    finished = client.wait(job.job_id, timeout=30)
    assert finished.state == JobState.SUCCEEDED
    assert finished.done
    assert finished.run_info is not None
    assert finished.run_info.num_samples == NUM_SAMPLES
    assert finished.run_info.num_classes == NUM_CLASSES
    assert finished.run_info.seed == TINY_CONFIG["seed"]
    assert finished.end_time is not None
    assert finished.create_time is not None
    assert finished.end_time >= finished.create_time

    # Replaying after a sequence skips what the caller already has.
    tail = list(client.watch(job.job_id, after_sequence=sequences[-2]))
    assert [event.sequence for event in tail] == [sequences[-1]]


def test_scores_follow_every_page(client: Client, finished_job: Job) -> None:
    scores = list(client.scores(finished_job.job_id, page_size=7))
    assert len(scores) == NUM_SAMPLES
    assert [score.rank for score in scores] == list(range(1, NUM_SAMPLES + 1))
    assert len({score.sample_id for score in scores}) == NUM_SAMPLES
    assert [s.score for s in scores] == sorted((s.score for s in scores), reverse=True)
    first = scores[0]
    assert re.fullmatch(r"digit-\d{4}", first.key)
    assert first.given_label_name in (
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    )
    assert 0.0 <= first.noise_probability <= 1.0
    assert 0.0 <= first.suggested_label_confidence <= 1.0

    page = client.score_page(finished_job.job_id, page_size=10)
    assert len(page.scores) == 10
    assert page.next_page_token
    assert page.total_size == NUM_SAMPLES

    top = list(client.scores(finished_job.job_id, top_k=5, page_size=2))
    assert top == scores[:5]
    suspected = list(client.scores(finished_job.job_id, only_suspected=True))
    assert suspected == [score for score in scores if score.suspected]
    threshold = scores[20].score
    assert list(client.scores(finished_job.job_id, min_score=threshold)) == [
        score for score in scores if score.score >= threshold
    ]


def test_summary(client: Client, finished_job: Job) -> None:
    summary = client.summary(finished_job.job_id)
    assert summary.job_id == finished_job.job_id
    assert summary.num_samples == NUM_SAMPLES
    assert summary.num_classes == NUM_CLASSES
    assert len(summary.transition_matrix) == NUM_CLASSES
    for row in summary.transition_matrix:
        assert len(row) == NUM_CLASSES
        assert sum(row) == pytest.approx(1.0, abs=1e-6)
    assert summary.estimated_label_accuracy == pytest.approx(1.0 - summary.estimated_noise_rate)
    assert sum(item.count for item in summary.classes) == NUM_SAMPLES
    suspected = list(client.scores(finished_job.job_id, only_suspected=True))
    assert summary.num_suspected == len(suspected)


def test_export_to_a_file_in_the_export_folder(client: Client, finished_job: Job, data_root: Path) -> None:
    destination = data_root / "exports" / f"{uuid.uuid4().hex}.jsonl"
    result = client.export(finished_job.job_id, destination.as_uri())
    assert result.rows_written == NUM_SAMPLES
    rows = [json.loads(line) for line in destination.read_text().splitlines()]
    assert len(rows) == NUM_SAMPLES
    assert result.bytes_written == destination.stat().st_size

    csv_destination = data_root / "exports" / f"{uuid.uuid4().hex}.data"
    suspected = client.export(finished_job.job_id, csv_destination.as_uri(), "csv", only_suspected=True)
    assert suspected.rows_written == client.summary(finished_job.job_id).num_suspected
    assert csv_destination.read_text().count("\n") >= suspected.rows_written  # header + rows


def test_request_id_makes_submit_idempotent(client: Client, dataset_uri: str) -> None:
    request_id = str(uuid.uuid4())
    config = SLOW_CONFIG
    first = client.submit(dataset_uri, config=config, request_id=request_id)
    try:
        again = client.submit(dataset_uri, config=config, request_id=request_id)
        assert again.job_id == first.job_id
        assert again.request_id == request_id
    finally:
        client.cancel(first.job_id)


def test_cancel_list_and_delete(client: Client, dataset_uri: str) -> None:
    job = client.submit(dataset_uri, config=SLOW_CONFIG, display_name="to cancel")
    cancelled = client.cancel(job.job_id)
    assert cancelled.job_id == job.job_id
    final = client.wait(job.job_id, timeout=60)
    assert final.state == JobState.CANCELLED
    assert client.cancel(job.job_id).state == JobState.CANCELLED  # a no-op once finished

    listed = list(client.list(page_size=1))
    ids = [item.job_id for item in listed]
    assert job.job_id in ids
    assert len(ids) == len(set(ids))
    created = [item.create_time.timestamp() for item in listed if item.create_time is not None]
    assert len(created) == len(listed)
    assert created == sorted(created, reverse=True), "jobs are listed newest first"
    assert job.job_id in {item.job_id for item in client.list(state="cancelled")}
    assert all(item.state == JobState.CANCELLED for item in client.list(state=JobState.CANCELLED))

    client.delete(job.job_id)
    with pytest.raises(NotFoundError):
        client.get(job.job_id)
    assert job.job_id not in {item.job_id for item in client.list()}


def test_healthy(server: RunningServer, free_port: int) -> None:
    with Client(server.address) as connected:
        assert connected.healthy()
        assert connected.healthy("o2u.v1.ScoringService")
    with Client(f"127.0.0.1:{free_port}", wait_for_ready=False) as nowhere:
        assert not nowhere.healthy(timeout=1.0)
