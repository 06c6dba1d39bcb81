"""Results of a finished job: ranked score pages, filters, page tokens, the summary and exports."""

from __future__ import annotations

import base64
import csv
import json
import math
from pathlib import Path

import grpc
import numpy as np
import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u.v1 import scoring_pb2_grpc
from tests.server_testing import DIGITS_SAMPLES, call_error, create_job, wait_for_job

Stub = scoring_pb2_grpc.ScoringServiceStub
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _all_scores(
    stub: Stub, job_id: str, page_size: int, **filters: object
) -> tuple[list[pb.NoiseScore], set[int]]:
    """Every score through the pages, and the total_size of each page."""
    scores: list[pb.NoiseScore] = []
    totals: set[int] = set()
    token = ""
    while True:
        request = pb.ListNoiseScoresRequest(job_id=job_id, page_size=page_size, page_token=token, **filters)
        page = stub.ListNoiseScores(request)
        assert len(page.noise_scores) <= page_size
        scores += page.noise_scores
        totals.add(page.total_size)
        token = page.next_page_token
        if not token:
            return scores, totals


def test_pages_cover_every_sample_in_rank_order(
    stub: Stub, finished_job: pb.ScoringJob, digits_flipped: np.ndarray
) -> None:
    scores, totals = _all_scores(stub, finished_job.job_id, page_size=70)
    assert totals == {DIGITS_SAMPLES}
    assert [s.rank for s in scores] == list(range(1, DIGITS_SAMPLES + 1))
    assert sorted(s.sample_id for s in scores) == list(range(DIGITS_SAMPLES))
    assert all(s.key.startswith("digit-") for s in scores)
    assert all(s.given_label_name == DIGIT_NAMES[s.given_label] for s in scores)
    assert all(s.suggested_label_name == DIGIT_NAMES[s.suggested_label] for s in scores)
    assert all(
        0.0 <= s.noise_probability <= 1.0 and 0.0 <= s.suggested_label_confidence <= 1.0 for s in scores
    )
    assert all(math.isfinite(s.score) for s in scores)
    # The flipped labels must crowd the top of the ranking (10% noise: 40 flipped of 400, so a
    # random order puts 4 there). This job trains 2 + 2 epochs: over noise seeds 0-5 its top 40
    # held 12-26 of them (the default plan: 30-35; the engine's tests hold that plan to its floors).
    top = {s.sample_id for s in scores[: len(digits_flipped)]}
    assert len(top & set(digits_flipped.tolist())) >= 0.5 * len(digits_flipped)


def test_page_size_default_cap_and_negative(stub: Stub, finished_job: pb.ScoringJob) -> None:
    default = stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=finished_job.job_id))
    assert len(default.noise_scores) == 100  # the module server's default_page_size
    capped = stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=finished_job.job_id, page_size=10_000))
    assert len(capped.noise_scores) == 150  # its max_page_size
    error = call_error(
        lambda: stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=finished_job.job_id, page_size=-5))
    )
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_size"])


def test_filters(stub: Stub, finished_job: pb.ScoringJob) -> None:
    everything, _ = _all_scores(stub, finished_job.job_id, page_size=150)
    top, totals = _all_scores(stub, finished_job.job_id, page_size=7, top_k=25)
    assert totals == {25}
    assert top == everything[:25]

    threshold = everything[60].score
    above, totals = _all_scores(stub, finished_job.job_id, page_size=50, min_score=threshold)
    assert above == [s for s in everything if s.score >= threshold]
    assert totals == {len(above)}

    suspected, totals = _all_scores(stub, finished_job.job_id, page_size=50, only_suspected=True)
    assert suspected == [s for s in everything if s.suspected]
    summary = stub.GetDatasetSummary(pb.GetDatasetSummaryRequest(job_id=finished_job.job_id)).summary
    assert totals == {summary.num_suspected}
    assert summary.num_suspected > 0

    both, _ = _all_scores(stub, finished_job.job_id, page_size=50, top_k=30, only_suspected=True)
    assert both == [s for s in everything[:30] if s.suspected]
    error = call_error(
        lambda: stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=finished_job.job_id, top_k=-1))
    )
    assert (error.code, error.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["top_k"])


def _forge(token: str) -> str:
    body, mac = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    data["a"] = 0  # jump back to the first rank
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{forged}.{mac}"


def test_page_tokens_are_tamper_evident_and_bound_to_the_request(
    stub: Stub, finished_job: pb.ScoringJob, digits_uri: str
) -> None:
    job_id = finished_job.job_id
    token = stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job_id, page_size=10)).next_page_token
    assert token
    # page_size may change between pages
    assert (
        stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job_id, page_size=5, page_token=token))
        .noise_scores[0]
        .rank
        == 11
    )

    for bad in (_forge(token), token[:-2], "garbage", token + "x"):
        error = call_error(
            lambda bad=bad: stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job_id, page_token=bad))  # type: ignore[misc]
        )
        assert (error.code, error.reason, error.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
            ["page_token"],
        )

    other_filter = call_error(
        lambda: stub.ListNoiseScores(
            pb.ListNoiseScoresRequest(job_id=job_id, page_token=token, only_suspected=True)
        )
    )
    assert (other_filter.code, other_filter.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_MISMATCH",
    )

    other = wait_for_job(stub, create_job(stub, digits_uri).job_id)
    other_job = call_error(
        lambda: stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=other.job_id, page_token=token))
    )
    assert other_job.code is grpc.StatusCode.INVALID_ARGUMENT
    jobs_token = stub.ListScoringJobs(pb.ListScoringJobsRequest(page_size=1)).next_page_token
    cross = call_error(
        lambda: stub.ListNoiseScores(pb.ListNoiseScoresRequest(job_id=job_id, page_token=jobs_token))
    )
    assert cross.code is grpc.StatusCode.INVALID_ARGUMENT


def test_dataset_summary(stub: Stub, finished_job: pb.ScoringJob) -> None:
    summary = stub.GetDatasetSummary(pb.GetDatasetSummaryRequest(job_id=finished_job.job_id)).summary
    k = 10
    assert (summary.job_id, summary.num_samples, summary.num_classes) == (
        finished_job.job_id,
        DIGITS_SAMPLES,
        k,
    )
    assert list(summary.class_names) == DIGIT_NAMES
    assert summary.estimated_label_accuracy == pytest.approx(1 - summary.estimated_noise_rate)
    assert 0 < summary.noise_rate_used < 1
    assert [c.label for c in summary.classes] == list(range(k))
    assert sum(c.count for c in summary.classes) == DIGITS_SAMPLES
    assert sum(c.suspected for c in summary.classes) == summary.num_suspected
    assert all(c.name == DIGIT_NAMES[c.label] for c in summary.classes)
    matrix = np.array(summary.transition_matrix).reshape(k, k)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-9)
    counts = [pair.count for pair in summary.confused_pairs]
    assert counts == sorted(counts, reverse=True)
    assert all(pair.given_label != pair.suggested_label for pair in summary.confused_pairs)
    assert not summary.clean_retraining.ran
    assert summary.run_info.num_samples == DIGITS_SAMPLES
    assert summary.run_info.model == "mlp"


def test_export_jsonl_and_csv(
    stub: Stub, finished_job: pb.ScoringJob, data_root: Path, tmp_path: Path
) -> None:
    folder = data_root / "exports" / finished_job.job_id
    jsonl = folder / "scores.jsonl"
    response = stub.ExportNoiseScores(
        pb.ExportNoiseScoresRequest(job_id=finished_job.job_id, destination_uri=jsonl.as_uri())
    )
    assert (response.destination_uri, response.rows_written) == (jsonl.as_uri(), DIGITS_SAMPLES)
    assert response.bytes_written == jsonl.stat().st_size
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [row["rank"] for row in rows] == list(range(1, DIGITS_SAMPLES + 1))
    assert set(rows[0]) >= {"sample_id", "key", "score", "suspected", "suggested_label_name"}

    again = call_error(
        lambda: stub.ExportNoiseScores(
            pb.ExportNoiseScoresRequest(job_id=finished_job.job_id, destination_uri=jsonl.as_uri())
        )
    )
    assert (again.code, again.reason) == (grpc.StatusCode.ALREADY_EXISTS, "DESTINATION_EXISTS")

    table = folder / "suspected.txt"
    response = stub.ExportNoiseScores(
        pb.ExportNoiseScoresRequest(
            job_id=finished_job.job_id,
            destination_uri=table.as_uri(),
            format=pb.EXPORT_FORMAT_CSV,
            only_suspected=True,
        )
    )
    with table.open(newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == response.rows_written > 0
    assert all(line["suspected"] == "true" for line in lines)

    unknown = call_error(
        lambda: stub.ExportNoiseScores(
            pb.ExportNoiseScoresRequest(
                job_id=finished_job.job_id, destination_uri=(folder / "x.bin").as_uri()
            )
        )
    )
    assert (unknown.code, unknown.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["format"])
    outside = call_error(
        lambda: stub.ExportNoiseScores(
            pb.ExportNoiseScoresRequest(
                job_id=finished_job.job_id, destination_uri=(tmp_path / "x.csv").as_uri()
            )
        )
    )
    assert outside.code is grpc.StatusCode.PERMISSION_DENIED
    dataset = data_root / "digits.npz"  # readable under a data root, but no export location
    before = dataset.read_bytes()
    onto = call_error(
        lambda: stub.ExportNoiseScores(
            pb.ExportNoiseScoresRequest(
                job_id=finished_job.job_id, destination_uri=dataset.as_uri(), format=pb.EXPORT_FORMAT_CSV
            )
        )
    )
    assert (onto.code, onto.reason) == (grpc.StatusCode.PERMISSION_DENIED, "EXPORT_NOT_ALLOWED")
    assert dataset.read_bytes() == before
