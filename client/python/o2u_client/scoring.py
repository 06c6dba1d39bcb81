"""The end-to-end scoring workflow shared by `o2u score` and the demo: submit a job, show its
progress live, then fetch and print the top suspects and the dataset health line."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from o2u.v1 import scoring_pb2
from o2u_client.client import Client
from o2u_client.models import Job, JobState
from o2u_client.progress import progress_display
from o2u_client.render import health_line, suspects_table
from o2u_client.results import DatasetSummary, NoiseScore
from o2u_client.text import safe_text

__all__ = ["ScoreOutcome", "score_dataset"]


@dataclass(frozen=True)
class ScoreOutcome:
    """The finished job and, if it succeeded, its summary and top suspects."""

    job: Job
    summary: DatasetSummary | None
    top_suspects: list[NoiseScore]

    @property
    def succeeded(self) -> bool:
        return self.job.state == JobState.SUCCEEDED


def score_dataset(
    client: Client,
    uri: str,
    *,
    console: Console | None,
    config: Mapping[str, Any] | scoring_pb2.ScoringConfig | None = None,
    format: str | None = None,
    display_name: str = "",
    request_id: str | None = None,
    top: int = 10,
    webhook_url: str | None = None,
    dataset_options: Mapping[str, str | None] | None = None,
    on_submitted: Callable[[Job], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> ScoreOutcome:
    """Submit, watch to the end and fetch results; prints progress and a report unless
    `console` is None (then it runs silently, e.g. for `--json`). `on_submitted` sees the job as
    soon as it exists, before the watch that may fail or be interrupted; `on_notice` gets the
    submit's line each time it waits out a full queue, and the watch's when it loses the server and
    when it is back (see `Client.submit` and `Client.watch`). The submit's answer shows the server
    was reached, so the watch gets the reconnect window from the start."""
    job = client.submit(
        uri,
        config=config,
        format=format,
        display_name=display_name,
        request_id=request_id,
        webhook_url=webhook_url,
        dataset_options=dataset_options,
        on_retry=on_notice,
    )
    if on_submitted is not None:
        on_submitted(job)
    if console is not None:
        console.print(safe_text(f"submitted {job.job_id} for {uri}"), markup=False, highlight=False)
        with progress_display(console) as show:
            for event in client.watch(job.job_id, on_connection=on_notice, server_reached=True):
                show(event)
    else:
        for _ in client.watch(job.job_id, on_connection=on_notice, server_reached=True):
            pass
    job = client.get(job.job_id)
    if job.state != JobState.SUCCEEDED:
        if console is not None:
            reason = f": {job.error.code} {job.error.reason}: {job.error.message}" if job.error else ""
            console.print(
                safe_text(f"job {job.job_id} {job.state.value}{reason}"), markup=False, highlight=False
            )
        return ScoreOutcome(job, None, [])
    summary = client.summary(job.job_id)
    top_suspects = list(client.scores(job.job_id, top_k=top, page_size=max(1, top))) if top > 0 else []
    if console is not None:
        if top_suspects:
            console.print(suspects_table(top_suspects, title=f"Top {len(top_suspects)} suspects"))
        console.print(health_line(summary), markup=False, highlight=False)
    return ScoreOutcome(job, summary, top_suspects)
