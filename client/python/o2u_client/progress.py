"""Showing a job's event stream to a person: a live rich progress bar on a terminal, one plain
line per event otherwise (CI logs, pipes, files), so the same code serves both."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from o2u_client.models import Event, EventType, JobState, Stage
from o2u_client.models import Progress as JobProgress
from o2u_client.text import safe_text

__all__ = ["describe_event", "format_duration", "progress_display"]

STAGE_NAMES = {
    Stage.UNSPECIFIED: "starting",
    Stage.LOADING: "loading",
    Stage.PRETRAINING: "pre-training",
    Stage.CYCLIC: "cyclic",
    Stage.CLEAN_RETRAINING: "clean retraining",
    Stage.RANKING: "ranking",
}


def format_duration(seconds: float) -> str:
    """`0:01:05` style, rounded to whole seconds; `-` when unknown."""
    if seconds < 0 or seconds != seconds:  # negative or NaN: no estimate yet
        return "-"
    return str(datetime.timedelta(seconds=round(seconds)))


def _figures(progress: JobProgress) -> str:
    if progress.stage == Stage.LOADING and (progress.bytes_read or progress.files_read):
        return f"{progress.bytes_read / 1e6:,.1f} MB, {progress.files_read:,} files read"
    if not progress.epochs_total:
        return ""  # ranking has no epochs, loss or throughput to show
    parts = [f"epoch {progress.epoch}/{progress.epochs_total}"]
    parts.append(f"loss {progress.mean_loss:.4f}")
    parts.append(f"lr {progress.learning_rate:.5f}")
    parts.append(f"{progress.samples_per_second:,.0f} samples/s")
    return "  ".join(parts)


def describe_event(event: Event) -> str:
    """One line for an event, e.g. `[ 45%] cyclic  epoch 3/10  loss 1.2345 ... ETA 0:00:12`."""
    if event.type == EventType.PROGRESS and event.progress is not None:
        progress = event.progress
        stage = STAGE_NAMES.get(progress.stage, progress.stage.value.lower())
        eta = format_duration(progress.eta_seconds)
        figures = _figures(progress)
        if not figures:
            return f"[{progress.fraction_done:4.0%}] {stage}"
        if not progress.epochs_total:
            return f"[{progress.fraction_done:4.0%}] {stage:<16} {figures}"
        return f"[{progress.fraction_done:4.0%}] {stage:<16} {figures}  ETA {eta}"
    line = f"state {event.state.value}"
    if event.message:
        line += f": {event.message}"
    if event.error is not None:
        line += f" ({event.error.code} {event.error.reason}: {event.error.message})"
    return safe_text(line)


class _LiveBar:
    """A rich progress bar fed with events; state changes print above the bar."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress = Progress(
            TextColumn("[bold]{task.fields[stage]:<16}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[figures]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
            refresh_per_second=4,
        )
        self._task: TaskID = self._progress.add_task("job", total=1.0, stage="queued", figures="", eta="-")

    def __enter__(self) -> _LiveBar:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def show(self, event: Event) -> None:
        if event.type == EventType.PROGRESS and event.progress is not None:
            progress = event.progress
            self._progress.update(
                self._task,
                completed=progress.fraction_done,
                stage=STAGE_NAMES.get(progress.stage, progress.stage.value.lower()),
                figures=_figures(progress),
                eta=format_duration(progress.eta_seconds),
            )
            return
        self._progress.console.print(describe_event(event), markup=False, highlight=False)
        if event.state == JobState.SUCCEEDED:
            self._progress.update(self._task, completed=1.0, stage="done", eta="0:00:00")
        elif event.state.is_terminal:
            self._progress.update(self._task, stage=event.state.value.lower())
        elif event.state == JobState.RUNNING:
            self._progress.update(self._task, stage="loading")


@contextmanager
def progress_display(console: Console) -> Iterator[Callable[[Event], None]]:
    """A function that shows one event; live bar on a terminal, plain lines elsewhere."""
    if console.is_terminal:
        with _LiveBar(console) as bar:
            yield bar.show
        return

    def print_line(event: Event) -> None:
        console.print(describe_event(event), markup=False, highlight=False, soft_wrap=True)
        console.file.flush()

    yield print_line
