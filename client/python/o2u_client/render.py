"""Human-readable views of results for the CLI and the demo: tables of suspects and jobs, the
dataset health line and the summary report. Everything returns rich renderables or strings;
printing (and choosing JSON instead) is the caller's business. Text from the server (names, keys,
URIs, messages) goes through `safe_text` and into `Text` (never markup), so it cannot style or
steer the terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from o2u_client.models import Job
from o2u_client.progress import STAGE_NAMES, format_duration
from o2u_client.results import DatasetSummary, NoiseScore
from o2u_client.text import safe_text

__all__ = [
    "health_line",
    "job_details",
    "jobs_table",
    "label_text",
    "make_console",
    "summary_report",
    "suspects_table",
]

# The transition matrix is only readable as a grid for a handful of classes.
MAX_MATRIX_CLASSES = 12


def make_console() -> Console:
    """A console on the current sys.stdout; off a terminal it is wider than rich's 80 columns so
    tables in logs and pipes are not wrapped."""
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "140"))
    return Console(file=sys.stdout, width=width, highlight=False)


def label_text(label: int, name: str) -> str:
    """`cat (3)` when the class has a name, else `3`."""
    return f"{safe_text(name)} ({label})" if name and name != str(label) else str(label)


def suspects_table(scores: Iterable[NoiseScore], title: str = "Top suspects") -> Table:
    table = Table(title=title, title_justify="left")
    for header in ("rank", "sample id", "key"):
        table.add_column(header, justify="right" if header != "key" else "left")
    table.add_column("given label")
    table.add_column("suggested label (confidence)")
    table.add_column("score", justify="right")
    table.add_column("noise prob.", justify="right")
    for score in scores:
        suggested = label_text(score.suggested_label, score.suggested_label_name)
        table.add_row(
            str(score.rank),
            str(score.sample_id),
            Text(safe_text(score.key)),
            Text(label_text(score.given_label, score.given_label_name)),
            Text(f"{suggested} ({score.suggested_label_confidence:.0%})"),
            f"{score.score:.4f}",
            f"{score.noise_probability:.2f}",
        )
    return table


def health_line(summary: DatasetSummary) -> str:
    """One line a reviewer can act on: how much of the batch is trustworthy."""
    line = (
        f"dataset health: estimated noise rate {summary.estimated_noise_rate:.1%} "
        f"(label accuracy {summary.estimated_label_accuracy:.1%}); "
        f"{summary.num_suspected:,} of {summary.num_samples:,} samples suspected"
    )
    if abs(summary.noise_rate_used - summary.estimated_noise_rate) > 1e-9:
        line += f" at noise rate {summary.noise_rate_used:.1%}"
    if summary.noise_rate_capped:
        line += (
            " (the scores did not separate into a clean majority and a noisy minority: the rate is the "
            "share of labels the network confidently disagreed with; check the training length)"
        )
    return line


def _class_name(summary: DatasetSummary, label: int) -> str:
    name = summary.class_names[label] if 0 <= label < len(summary.class_names) else ""
    return label_text(label, name)


def summary_report(summary: DatasetSummary, *, max_pairs: int = 10) -> RenderableType:
    parts: list[RenderableType] = [Text(health_line(summary))]
    if summary.clean_retraining is not None:
        retraining = summary.clean_retraining
        parts.append(
            Text(
                f"clean retraining: accuracy {retraining.accuracy_without_removal:.1%} without removal, "
                f"{retraining.accuracy_with_removal:.1%} after removing {retraining.removed:,} samples"
            )
        )
    classes = Table(title="Noise per class", title_justify="left")
    for header in ("label", "samples", "suspected", "noise rate"):
        classes.add_column(header, justify="left" if header == "label" else "right")
    for item in summary.classes:
        classes.add_row(
            Text(label_text(item.label, item.name)),
            f"{item.count:,}",
            f"{item.suspected:,}",
            f"{item.noise_rate:.1%}",
        )
    parts.append(classes)
    if summary.confused_pairs:
        pairs = Table(title="Most confused (given -> suggested)", title_justify="left")
        for header in ("given", "suggested", "suspected samples"):
            pairs.add_column(header, justify="right" if header.startswith("suspected") else "left")
        for pair in summary.confused_pairs[:max_pairs]:
            pairs.add_row(
                Text(_class_name(summary, pair.given_label)),
                Text(_class_name(summary, pair.suggested_label)),
                f"{pair.count:,}",
            )
        parts.append(pairs)
    if summary.transition_matrix and summary.num_classes <= MAX_MATRIX_CLASSES:
        matrix = Table(title="Transition matrix (row = given, column = suggested)", title_justify="left")
        matrix.add_column("")
        for label in range(summary.num_classes):
            matrix.add_column(Text(_class_name(summary, label)), justify="right")
        for label, row in enumerate(summary.transition_matrix):
            matrix.add_row(Text(_class_name(summary, label)), *(f"{value:.2f}" for value in row))
        parts.append(matrix)
    if summary.run_info is not None:
        info = summary.run_info
        parts.append(
            Text(
                f"run: model {info.model}, seed {info.seed}, device {info.device}, "
                f"engine {info.engine_version}, torch {info.torch_version}"
            )
        )
    return Group(*parts)


def _progress_text(job: Job) -> str:
    if job.done or job.progress is None:
        return ""
    stage = STAGE_NAMES.get(job.progress.stage, job.progress.stage.value.lower())
    return f"{job.progress.fraction_done:.0%} {stage}"


def jobs_table(jobs: Sequence[Job]) -> Table:
    table = Table(title_justify="left")
    # Job ids are what a reader copies into the next command: never shorten them.
    table.add_column("job id", no_wrap=True, min_width=max((len(job.job_id) for job in jobs), default=6))
    table.add_column("state", no_wrap=True)
    table.add_column("name")
    table.add_column("dataset", overflow="fold")
    table.add_column("created", no_wrap=True, min_width=19)
    table.add_column("progress")
    for job in jobs:
        created = job.create_time.strftime("%Y-%m-%d %H:%M:%S") if job.create_time else ""
        table.add_row(
            Text(safe_text(job.job_id)),
            job.state.value,
            Text(safe_text(job.display_name)),
            Text(safe_text(job.dataset_uri)),
            created,
            _progress_text(job),
        )
    return table


def job_details(job: Job) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, str]] = [
        ("job id", job.job_id),
        ("state", job.state.value),
        ("name", job.display_name),
        (
            "dataset",
            job.dataset_uri
            + (f" ({job.dataset_format.lower()})" if job.dataset_format != "UNSPECIFIED" else ""),
        ),
        ("request id", job.request_id),
        ("attempts", str(job.attempts)),
        ("created", job.create_time.isoformat() if job.create_time else ""),
        ("started", job.start_time.isoformat() if job.start_time else ""),
        ("ended", job.end_time.isoformat() if job.end_time else ""),
    ]
    if job.webhook_url:
        rows.append(("webhook", job.webhook_url))
        for delivery in job.webhook_deliveries:
            answer = f"HTTP {delivery.http_status}" if delivery.http_status else delivery.error
            rows.append((f"  attempt {delivery.attempt}", f"{delivery.outcome.lower()} ({answer})"))
    if job.config:
        rows.append(("config", ", ".join(f"{key}={value}" for key, value in job.config.items())))
    if job.progress is not None and not job.done:
        progress = job.progress
        rows.append(("progress", f"{_progress_text(job)}, ETA {format_duration(progress.eta_seconds)}"))
    if job.run_info is not None:
        info = job.run_info
        rows.append(("run", f"{info.num_samples:,} samples, {info.num_classes} classes, model {info.model}"))
        rows.append(("device", f"{info.device} (seed {info.seed}, torch {info.torch_version})"))
    if job.error is not None:
        rows.append(("error", f"{job.error.code} {job.error.reason}: {job.error.message}"))
    for key, value in rows:
        if value:
            grid.add_row(key, Text(safe_text(value)))
    return grid
