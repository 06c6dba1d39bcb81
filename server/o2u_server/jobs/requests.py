"""Checks of request fields that need nothing but the request (and the storage rules for URIs), made
before the store is touched. Each failure is InvalidArgument (or PermissionDenied for a URI outside
what the server may read) naming the field, so a caller can fix the request; whether a dataset
actually exists is the manager's check, made once per new job. A display name is shown to other
people (the CLI, dashboards), so it may hold no control or bidirectional-override characters.
"""

from __future__ import annotations

import math
import re
import uuid

from o2u_server.datasets import check_dataset_options, check_dataset_uri
from o2u_server.domain import JobSpec, ScoreFilter
from o2u_server.errors import InvalidArgument
from o2u_server.jobs.engine import check_requested_epochs, engine_config
from o2u_server.storage import Storage
from o2u_server.text import text_problem

__all__ = ["MAX_DISPLAY_NAME", "check_job_id", "check_job_spec", "check_score_filter", "new_job_id"]

MAX_DISPLAY_NAME = 256  # characters
_JOB_ID = re.compile(r"job-[0-9a-f]{32}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex}"


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        shown = job_id if len(job_id) <= 80 else job_id[:80] + "..."
        raise InvalidArgument(
            f"job_id {shown!r} is not a job id; job ids look like 'job-' followed by 32 hex digits",
            reason="INVALID_JOB_ID",
            field="job_id",
        )
    return job_id


def check_job_spec(spec: JobSpec, storage: Storage, *, max_epochs: int | None = None) -> None:
    """A new job's request_id, display name, config values (and, with `max_epochs`, the epochs it
    names), URIs and dataset options, in that order."""
    if spec.request_id is not None and not _REQUEST_ID.fullmatch(spec.request_id):
        raise InvalidArgument(
            "request_id must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_' (a UUID is recommended)",
            reason="INVALID_REQUEST_ID",
            field="request_id",
        )
    problem = text_problem(spec.display_name, max_chars=MAX_DISPLAY_NAME)
    if problem is not None:
        raise InvalidArgument(f"display_name {problem}", reason="INVALID_DISPLAY_NAME", field="display_name")
    config = engine_config(spec.config)  # INVALID_ARGUMENT naming the field, before anything is stored
    if max_epochs is not None:
        check_requested_epochs(config, max_epochs)
    check_dataset_uri(spec.dataset_uri, spec.dataset_format, storage)
    check_dataset_options(spec.dataset_uri, spec.dataset_format, spec.dataset_options)
    if spec.initial_weights_uri:
        storage.parse(spec.initial_weights_uri, field="config.initial_weights_uri")


def check_score_filter(score_filter: ScoreFilter) -> None:
    if score_filter.top_k < 0:
        raise InvalidArgument(
            "top_k must be >= 0 (0 means all samples)", reason="INVALID_FILTER", field="top_k"
        )
    if score_filter.min_score is not None and not math.isfinite(score_filter.min_score):
        raise InvalidArgument("min_score must be a finite number", reason="INVALID_FILTER", field="min_score")
