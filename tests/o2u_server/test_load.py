"""A short run of bench/load.py: 50 watch streams and 200 unary calls per second for a few seconds
against a server process while a job trains. No call may fail, few may be skipped for want of an
answer, and health must answer throughout."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.load import local_server, run_load

DURATION_S = 4.0


def test_short_load_has_no_errors_and_health_answers_throughout(tmp_path: Path) -> None:
    with local_server(tmp_path) as (address, pid, dataset_uri):
        report = asyncio.run(run_load(address, dataset_uri, pid=pid, duration_s=DURATION_S))
    print("\n".join(report.lines()))
    assert report.errors == 0, report.lines()
    # A call is skipped when 64 are already in flight: the server fell behind for a moment on a busy
    # machine, which the schedule check below bounds; a skip is never a failed call.
    assert report.skipped <= 0.05 * DURATION_S * 200, report.lines()
    assert report.health_failures == 0
    assert report.health_checks >= 2 * DURATION_S, "health was checked about four times a second"
    assert report.duration_s < DURATION_S + 6  # bounded: in-flight calls get at most their timeout
    for name, stats in report.unary.items():
        assert len(stats.latencies_s) >= 0.5 * DURATION_S * 200 / 3, f"{name} fell far behind the schedule"
    assert report.watch_events > 0
    assert report.epochs, "the job kept training while the calls ran"
    assert report.summary().startswith("summary: ")
