"""The `o2u` CLI, run in-process through `main([...])` against a real server: JSON output that
parses, exit statuses a shell can branch on, `score` end to end with plain progress lines when
stdout is not a terminal, and `--config` in either protobuf JSON naming; `--json score`, run as a
process and interrupted, has named its job on stderr as soon as it existed, and `watch`, run as a
process, rides out a server that refuses connections for a while, saying so on stderr. `score`
says on stderr when it waits out a full queue, and its watch, right after a submit that reached the
server, rides out an outage before the first event that fails a `watch` of a target never reached.
"""

from __future__ import annotations

import functools
import json
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from o2u.v1 import scoring_pb2 as pb
from o2u_client import Client, Job, JobState, cli
from o2u_client.cli import main
from tests.o2u_client.full_queue import FreeTheQueueWhenFull, full_queue
from tests.o2u_client.loopback_proxy import LoopbackProxy
from tests.server_testing import DIGITS_SAMPLES as NUM_SAMPLES
from tests.server_testing import SLOW_CONFIG, TINY_CONFIG, RunningServer

# A well-formed job id that no server ever issued.
MISSING_JOB_ID = "job-" + "0" * 32

TINY_FLAGS = [
    "--model=mlp",
    "--seed=0",
    "--pretrain-epochs=2",
    "--cycle-length-epochs=2",
    "--num-cycles=1",
    "--pretrain-batch-size=64",
    "--cyclic-batch-size=32",
]


O2U = Path(sys.executable).parent / "o2u"
SUBMITTED = re.compile(r"submitted (job-[0-9a-f]{32}) \(request id ([0-9a-f-]{36})\)")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_score_end_to_end_prints_progress_lines_and_a_report(
    capsys: pytest.CaptureFixture[str], server: RunningServer, dataset_uri: str
) -> None:
    status, out, err = run(
        capsys, "--target", server.address, "score", dataset_uri, *TINY_FLAGS, "--top", "5"
    )
    assert status == 0, err
    assert err == ""
    assert re.search(r"^submitted job-\S+ for ", out, re.MULTILINE)
    # Not a terminal: one plain line per epoch, no cursor control codes.
    assert "\x1b[" not in out
    progress_lines = re.findall(
        r"^\[\s*\d+%\] (pre-training|cyclic)\s+epoch (\d+)/(\d+)  loss \S+  lr \S+ .*ETA", out, re.M
    )
    assert {stage for stage, _, _ in progress_lines} == {"pre-training", "cyclic"}
    assert "state SUCCEEDED" in out
    assert "Top 5 suspects" in out
    for header in ("rank", "sample id", "key", "given label", "suggested label", "score", "noise prob."):
        assert header in out
    assert len(re.findall(r"digit-\d{4}", out)) == 5
    assert re.search(r"dataset health: estimated noise rate \d+\.\d% \(label accuracy \d+\.\d%\)", out)


def test_score_json_and_no_wait(
    capsys: pytest.CaptureFixture[str], server: RunningServer, dataset_uri: str
) -> None:
    status, out, err = run(
        capsys, "score", dataset_uri, "--target", server.address, "--json", *TINY_FLAGS, "--top=3"
    )
    assert status == 0
    document = json.loads(out)
    assert document["job"]["state"] == "SUCCEEDED"
    assert SUBMITTED.fullmatch(err.strip()), err  # stdout stays one document; stderr names the job
    assert err.split()[1] == document["job"]["job_id"]
    assert document["summary"]["num_samples"] == NUM_SAMPLES
    assert [s["rank"] for s in document["top_suspects"]] == [1, 2, 3]

    request_id = str(uuid.uuid4())
    flags = [
        "--target",
        server.address,
        "--json",
        "score",
        dataset_uri,
        "--no-wait",
        "--request-id",
        request_id,
    ]
    status, out, _ = run(capsys, *flags, "--pretrain-epochs=500", "--model=mlp")
    assert status == 0
    job = json.loads(out)
    assert job["request_id"] == request_id
    assert job["config"] == {"model": "mlp", "pretrain_epochs": 500}
    assert run(capsys, "--target", server.address, "cancel", job["job_id"])[0] == 0
    status, out, _ = run(capsys, "--target", server.address, "watch", job["job_id"], "--json")
    assert status == 1, "a cancelled job exits 1"
    events = json_lines(out)
    assert events[-1]["state"] == "CANCELLED"
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))


def test_read_commands_with_json(
    capsys: pytest.CaptureFixture[str], server: RunningServer, finished_job: Job, data_root: Path
) -> None:
    target = ["--target", server.address, "--json"]
    status, out, _ = run(capsys, *target, "get", finished_job.job_id)
    assert status == 0
    assert json.loads(out)["job_id"] == finished_job.job_id

    status, out, _ = run(capsys, *target, "jobs", "--state", "succeeded", "--page-size", "1")
    assert status == 0
    jobs = json_lines(out)
    assert finished_job.job_id in {job["job_id"] for job in jobs}
    assert {job["state"] for job in jobs} == {"SUCCEEDED"}

    status, out, _ = run(capsys, *target, "scores", finished_job.job_id, "--page-size", "50")
    scores = json_lines(out)
    assert status == 0
    assert [s["rank"] for s in scores] == list(range(1, NUM_SAMPLES + 1))
    status, out, _ = run(capsys, *target, "scores", finished_job.job_id, "--top-k", "4")
    assert len(json_lines(out)) == 4

    status, out, _ = run(capsys, *target, "summary", finished_job.job_id)
    summary = json.loads(out)
    assert status == 0
    assert len(summary["transition_matrix"]) == summary["num_classes"]

    status, out, _ = run(capsys, *target, "watch", finished_job.job_id)
    assert status == 0
    assert json_lines(out)[-1]["state"] == "SUCCEEDED"

    destination = data_root / "exports" / "cli" / "scores.csv"
    status, out, _ = run(capsys, *target, "export", finished_job.job_id, destination.as_uri())
    assert status == 0
    assert json.loads(out)["rows_written"] == NUM_SAMPLES
    assert destination.read_text().splitlines()[0].startswith(("sample_id", "rank"))

    status, out, _ = run(capsys, *target, "health")
    assert (status, json.loads(out)["serving"]) == (0, True)


def test_human_output_of_read_commands(
    capsys: pytest.CaptureFixture[str], server: RunningServer, finished_job: Job
) -> None:
    for argv, expected in [
        (["get", finished_job.job_id], "SUCCEEDED"),
        (["jobs"], finished_job.job_id),
        (["summary", finished_job.job_id], "dataset health: estimated noise rate"),
        (["scores", finished_job.job_id, "--top-k", "3"], "Noise scores"),
        (["watch", finished_job.job_id], "state SUCCEEDED"),
    ]:
        status, out, err = run(capsys, "--target", server.address, *argv)
        assert (status, err) == (0, ""), argv
        assert expected in out, argv


def test_delete_via_cli(capsys: pytest.CaptureFixture[str], server: RunningServer, dataset_uri: str) -> None:
    with Client(server.address) as client:
        job = client.wait(client.submit(dataset_uri, config=TINY_CONFIG).job_id, timeout=120)
    status, out, _ = run(capsys, "--target", server.address, "delete", job.job_id)
    assert status == 0
    assert out.strip() == f"deleted {job.job_id}"
    status, _, err = run(capsys, "--target", server.address, "get", job.job_id)
    assert status == 4
    assert err.startswith("error: NOT_FOUND: ")


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["get", MISSING_JOB_ID], 4, "error: NOT_FOUND: "),
        (["get", "job-nope"], 5, "error: INVALID_ARGUMENT: "),
        (["summary", MISSING_JOB_ID], 4, "error: NOT_FOUND: "),
        (["score", "file:///etc/passwd.npz"], 10, "error: PERMISSION_DENIED: "),
        (["score", "{uri}", "--noise-rate", "2"], 5, "config.noise_rate"),
    ],
)
def test_errors_map_to_exit_statuses(
    capsys: pytest.CaptureFixture[str],
    server: RunningServer,
    dataset_uri: str,
    argv: list[str],
    status: int,
    message: str,
) -> None:
    argv = [arg.replace("{uri}", dataset_uri) for arg in argv]
    got, out, err = run(capsys, "--target", server.address, *argv)
    assert got == status
    assert message in err
    assert out == ""


def test_usage_and_connection_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, free_port: int
) -> None:
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "score")[0] == 2  # missing URI
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "exit status:" in out
    assert "6   UNAVAILABLE" in out
    status, _, err = run(capsys, "--token-file", str(tmp_path / "missing"), "jobs")
    assert status == 2
    assert "cannot read token file" in err
    status, _, err = run(capsys, "--target", f"127.0.0.1:{free_port}", "--timeout", "2", "jobs")
    assert status == 6
    assert err.startswith("error: UNAVAILABLE: ")
    assert run(capsys, "--target", f"127.0.0.1:{free_port}", "health")[0] == 6


def test_target_from_the_environment(
    capsys: pytest.CaptureFixture[str], server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("O2U_TARGET", server.address)
    status, out, _ = run(capsys, "health", "--json")
    assert status == 0
    assert json.loads(out) == {"serving": True, "target": server.address}


def test_score_of_a_job_that_fails_exits_1(
    capsys: pytest.CaptureFixture[str], server: RunningServer, data_root: Path
) -> None:
    bad = data_root / "bad-labels.npz"
    np.savez(bad, x=np.zeros((20, 4), dtype=np.float32), y=np.full(20, -1))
    status, out, err = run(capsys, "--target", server.address, "score", bad.as_uri(), *TINY_FLAGS)
    assert status == 1, (out, err)
    assert re.search(r"^job job-\S+ FAILED: INVALID_ARGUMENT \S+: ", out, re.MULTILINE)
    assert "Top" not in out
    status, out, _ = run(capsys, "--target", server.address, "--json", "score", bad.as_uri(), *TINY_FLAGS)
    document = json.loads(out)
    assert status == 1
    assert document["job"]["state"] == "FAILED"
    assert document["job"]["error"]["code"] == "INVALID_ARGUMENT"
    assert document["summary"] is None


def test_augment_and_score_flags_set_the_enum_fields(
    capsys: pytest.CaptureFixture[str], server: RunningServer, dataset_uri: str
) -> None:
    flags = ["--target", server.address, "--json", "score", dataset_uri, *TINY_FLAGS]
    status, out, err = run(capsys, *flags, "--augment=none", "--score=o2u_loss")
    assert status == 0, err
    document = json.loads(out)
    assert document["job"]["config"]["augmentation"] == pb.AUGMENTATION_NONE  # enum numbers
    assert document["job"]["config"]["score"] == pb.NOISE_SCORE_KIND_O2U_LOSS
    assert document["job"]["run_info"]["resolved_config"]["score"] == "o2u_loss"
    assert run(capsys, *flags, "--augment=flip")[0] == 2  # not a choice: a usage error
    assert run(capsys, *flags, "--score=loss")[0] == 2


def test_help_prints_the_exit_status_table_of_the_api_reference(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0
    helped = re.findall(r"^  (\d+)\s+(.+)$", out.split("exit status:", 1)[1], flags=re.MULTILINE)
    reference = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    table = reference.split("### Exit status", 1)[1].split("\n\n", 2)[1]
    documented = re.findall(r"^\| (\d+) \| (.+) \|$", table, flags=re.MULTILINE)
    assert [(code, text.replace("`", "")) for code, text in documented] == helped


def _stderr_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first line the process writes to stderr, within `timeout` seconds."""
    assert process.stderr is not None
    return _next_line(process.stderr, timeout)


def _next_line(stream: Any, timeout: float) -> str:
    """The next line of a process's pipe, within `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        assert selector.select(timeout), f"no line from the process within {timeout} s"
    line: str = stream.readline()
    return line


def test_interrupted_json_score_has_named_its_job(server: RunningServer, dataset_uri: str) -> None:
    slow = [f"--{name.replace('_', '-')}={value}" for name, value in SLOW_CONFIG.items()]
    process = subprocess.Popen(
        [str(O2U), "--target", server.address, "--json", "score", dataset_uri, *slow],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Named while the job still trains, not only in the document printed at the end.
        submitted = SUBMITTED.fullmatch(_stderr_line(process, timeout=120).strip())
        assert submitted is not None
        time.sleep(0.5)  # into the watch
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    job_id = submitted.group(1)
    assert process.returncode == 130, err
    assert out == "", "no partial document on stdout"
    assert f"interrupted: job {job_id} is on the server" in err
    assert f"follow it with: o2u watch {job_id}" in err
    with Client(server.address, timeout=20.0) as client:
        job = client.get(job_id)
        assert job.request_id == submitted.group(2)
        assert job.state in (JobState.QUEUED, JobState.RUNNING), "the job runs on"
        client.cancel(job_id)
        assert client.wait(job_id, timeout=60).state == JobState.CANCELLED


def test_watch_rides_out_a_server_that_refuses_connections(server: RunningServer, dataset_uri: str) -> None:
    with Client(server.address, timeout=20.0) as client, LoopbackProxy(server.port) as proxy:
        job = client.submit(dataset_uri, config=SLOW_CONFIG)
        process = subprocess.Popen(
            [str(O2U), "--target", proxy.address, "--json", "watch", job.job_id, "--reconnect-window=60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            assert process.stderr is not None
            first = json.loads(_next_line(process.stdout, timeout=60))
            proxy.refuse()  # the stream breaks, and every reconnect is turned away
            lost = _next_line(process.stderr, timeout=30)
            time.sleep(1.0)  # a few failed reconnects
            proxy.restore()
            back = _next_line(process.stderr, timeout=30)
            client.cancel(job.job_id)  # the watch then ends with the job's final event
            out, err = process.communicate(timeout=60)
        finally:
            process.kill()
            process.wait()
    assert lost.startswith("notice: lost the connection to the server (UNAVAILABLE"), lost
    assert "reconnecting for up to 60 s" in lost
    assert back.startswith("notice: reconnected to the server; the watch goes on after event "), back
    assert err == ""
    assert process.returncode == 1, "a cancelled job exits 1"
    events = [first, *json_lines(out)]
    assert [event["sequence"] for event in events] == list(range(1, len(events) + 1)), "none lost or repeated"
    assert events[-1]["state"] == "CANCELLED"


def test_score_says_when_it_waits_out_a_full_queue(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    start_server: Callable[..., RunningServer],
    dataset_uri: str,
) -> None:
    with full_queue(start_server, dataset_uri) as (server, owner, running, queued):

        def free() -> None:  # once the first try is refused: room in the queue, and a free worker
            for job in (queued, running):
                owner.cancel(job.job_id)

        freeing = FreeTheQueueWhenFull(free)
        # The server asks for 30 s (QUEUE_FULL); a shorter cap keeps the test quick.
        monkeypatch.setattr(
            cli, "Client", functools.partial(Client, max_retry_delay=0.5, interceptors=[freeing])
        )
        status, out, err = run(capsys, "--target", server.address, "score", dataset_uri, *TINY_FLAGS)
    assert len(freeing.requests) == 2, "refused once, then let in"
    assert status == 0, err
    assert err == "notice: the server's queue is full; retrying in 0.5 s (try 2 of 4)\n"
    assert "state SUCCEEDED" in out


class _CutAfterSubmit(grpc.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Once a CreateScoringJob is answered, makes the proxy refuse connections for `outage` s: the
    server goes away between the submit and the watch's first event."""

    def __init__(self, proxy: LoopbackProxy, outage: float) -> None:
        self.proxy = proxy
        self.restore = threading.Timer(outage, proxy.restore)

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        outcome = continuation(client_call_details, request)
        created = str(client_call_details.method).endswith("/CreateScoringJob")
        if created and outcome.code() == grpc.StatusCode.OK and self.restore.ident is None:
            self.proxy.refuse()
            self.restore.start()
        return outcome


def test_score_rides_out_an_outage_between_its_submit_and_its_watch(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    server: RunningServer,
    dataset_uri: str,
) -> None:
    with LoopbackProxy(server.port) as proxy:
        cut = _CutAfterSubmit(proxy, outage=3.0)
        # A watch that never reached the server gives up after one reopen attempt, well within 3 s.
        monkeypatch.setattr(cli, "Client", functools.partial(Client, watch_reconnects=1, interceptors=[cut]))
        flags = ["--target", proxy.address, "--reconnect-window=60"]
        status, out, err = run(capsys, *flags, "score", dataset_uri, *TINY_FLAGS)
        cut.restore.join()
        assert status == 0, err
        lost, back = err.splitlines()
        assert lost.startswith("notice: lost the connection to the server (UNAVAILABLE"), lost
        assert "reconnecting for up to 60 s" in lost
        assert back == "notice: reconnected to the server; the watch goes on after event 0"
        assert "state SUCCEEDED" in out
        # `watch` on its own has not reached the server: the same outage fails it fast.
        job_id = re.findall(r"^submitted (job-\S+) for ", out, re.MULTILINE)[0]
        proxy.refuse()
        status, out, err = run(capsys, *flags, "watch", job_id)
    assert status == 6, err
    assert err.startswith("error: UNAVAILABLE: cannot reach the server to resume watching the job"), err
    assert "notice:" not in err


def test_config_file_in_either_protobuf_json_naming(
    capsys: pytest.CaptureFixture[str], server: RunningServer, dataset_uri: str, tmp_path: Path
) -> None:
    canonical = {  # protobuf's canonical JSON: lowerCamelCase, int64 quoted, enums by name
        "model": "mlp",
        "seed": "7",
        "pretrainEpochs": 2,
        "cycleLengthEpochs": 2,
        "numCycles": 1,
        "augmentation": "AUGMENTATION_NONE",
        "score": "NOISE_SCORE_KIND_O2U_LOSS",
    }
    proto_names = {
        "model": "mlp",
        "seed": 7,
        "pretrain_epochs": 2,
        "cycle_length_epochs": 2,
        "num_cycles": 1,
        "augmentation": "AUGMENTATION_NONE",
        "score": pb.NOISE_SCORE_KIND_O2U_LOSS,
    }
    expected = {
        "model": "mlp",
        "seed": 7,
        "pretrain_epochs": 2,
        "cycle_length_epochs": 2,
        "num_cycles": 1,
        "augmentation": pb.AUGMENTATION_NONE,
        "score": pb.NOISE_SCORE_KIND_O2U_LOSS,
        "pretrain_batch_size": 64,  # from the flag, on top of the file
    }
    config = tmp_path / "config.json"
    flags = ["--target", server.address, "--json", "score", dataset_uri, "--no-wait", "--config", str(config)]
    for document in (canonical, proto_names):
        config.write_text(json.dumps(document))
        status, out, err = run(capsys, *flags, "--pretrain-batch-size=64")
        assert status == 0, err
        job = json.loads(out)
        assert job["config"] == expected, document
        assert run(capsys, "--target", server.address, "cancel", job["job_id"])[0] == 0


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"model": "mlp", "learningRate": 0.1}, "unknown ScoringConfig field 'learningRate'"),
        ({"pretrainEpochs": "two"}, "Failed to parse pretrainEpochs field"),
        ({"seed": 1.5}, "ScoringConfig.seed"),
        ({"augmentation": "CROP"}, "augmentation"),
        ({"num_cycles": 2, "numCycles": 3}, "num_cycles is given twice"),
    ],
)
def test_config_file_errors_name_the_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, document: dict[str, Any], message: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(document))
    # Refused before any call: the target is never dialled.
    status, out, err = run(capsys, "score", "file:///data/batch.npz", "--config", str(config))
    assert status == 2
    assert out == ""
    assert err.startswith(f"error: --config {config}: ")
    assert message in err
