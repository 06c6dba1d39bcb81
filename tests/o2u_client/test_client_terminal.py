"""Text from a server or a dataset cannot steer the terminal: the CLI's tables, details, progress
lines and error messages show control characters and bidirectional overrides as escapes."""

from __future__ import annotations

import io

import grpc
import pytest
from rich.console import Console

from o2u.v1 import scoring_pb2 as pb
from o2u_client import Job
from o2u_client.cli import _print_error
from o2u_client.errors import FieldViolation, O2UError
from o2u_client.models import Event
from o2u_client.progress import describe_event
from o2u_client.render import job_details, jobs_table
from o2u_client.text import safe_text

HOSTILE = "\x1b[31mred\x1b[0m \x1b]0;owned\x07 \u202egnp.exe \r\n\x08"


def _printed(renderable: object) -> str:
    out = io.StringIO()
    Console(file=out, width=300, force_terminal=True, color_system=None).print(renderable)
    return out.getvalue()


def _safe(text: str) -> None:
    for character in ("\x1b", "\x07", "\u202e", "\r", "\x08"):
        assert character not in text, repr(text)


def test_safe_text_escapes_what_would_act_and_keeps_the_rest() -> None:
    assert safe_text(HOSTILE) == "\\x1b[31mred\\x1b[0m \\x1b]0;owned\\x07 \\u202egnp.exe \\r\\n\\x08"
    assert safe_text("café ✓ 日本 batch-42") == "café ✓ 日本 batch-42"


def test_jobs_and_details_print_hostile_text_escaped() -> None:
    job = Job.from_proto(
        pb.ScoringJob(
            job_id="job-" + "a" * 32,
            display_name=HOSTILE,
            dataset=pb.DatasetRef(uri=f"file:///data/{HOSTILE}.npz"),
            state=pb.JOB_STATE_FAILED,
            error=pb.JobError(code=3, message=HOSTILE, reason="INVALID_DATASET"),
        )
    )
    for renderable in (jobs_table([job]), job_details(job)):
        text = _printed(renderable)
        _safe(text)
        assert "\\x1b[31mred" in text


def test_progress_lines_print_hostile_messages_escaped() -> None:
    event = Event.from_proto(
        pb.JobEvent(
            sequence=3,
            type=pb.JOB_EVENT_TYPE_STATE_CHANGED,
            state=pb.JOB_STATE_FAILED,
            message=HOSTILE,
            error=pb.JobError(code=3, message=HOSTILE, reason="X"),
        )
    )
    _safe(describe_event(event))


def test_errors_print_hostile_messages_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    _print_error(
        O2UError(
            grpc.StatusCode.NOT_FOUND,
            f"file:///{HOSTILE} does not exist",
            field_violations=(FieldViolation(field=HOSTILE, description="other text"),),
        )
    )
    err = capsys.readouterr().err
    _safe(err)
    assert "\\x1b]0;owned" in err
