"""The `o2u` command line: submit datasets for scoring with a live progress bar, inspect jobs,
read scores and summaries, and export results, against any o2u server.

Each subcommand is a small function taking the parsed arguments, a connected `Client` and an
`Output`, and returning the process exit status. `--json` switches every command to
machine-readable output (one JSON document, or JSON lines for streams). Exit statuses are
stable so shell scripts can branch on them; see `EPILOG`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from rich.console import RenderableType

from o2u.v1 import scoring_pb2
from o2u_client.channel import check_token_transport
from o2u_client.cli_options import (
    CONFIG_OPTIONS,
    add_config_options,
    add_dataset_options,
    add_global_options,
    dataset_options,
    global_defaults,
)
from o2u_client.client import Client
from o2u_client.converters import DATASET_FORMATS, EXPORT_FORMATS, build_config, config_from_json
from o2u_client.errors import EXIT_CODES, EXIT_GENERIC_ERROR, O2UError
from o2u_client.gate import EXIT_GATE_FAILED, gate_verdict
from o2u_client.models import Job, JobState, to_json_dict
from o2u_client.progress import progress_display
from o2u_client.render import job_details, jobs_table, make_console, summary_report, suspects_table
from o2u_client.results import DatasetSummary
from o2u_client.scoring import score_dataset
from o2u_client.text import safe_text

__all__ = ["EPILOG", "EXIT_FAILED_JOB", "EXIT_USAGE", "build_parser", "main"]

EXIT_FAILED_JOB = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EXIT_NOTES = {grpc.StatusCode.UNAVAILABLE: " (health: not serving or unreachable)"}
EPILOG = (
    "exit status:\n"
    "  0   success (health: SERVING)\n"
    f"  {EXIT_FAILED_JOB}   the job ended FAILED or CANCELLED (score, watch)\n"
    f"  {EXIT_USAGE}   usage error: bad option, unreadable certificate or token file, unknown config field\n"
    f"  {EXIT_GENERIC_ERROR}   any gRPC error not listed below\n"
    + "".join(
        f"  {status:<3} {code.name}{EXIT_NOTES.get(code, '')}\n"
        for code, status in sorted(EXIT_CODES.items(), key=lambda kv: kv[1])
    )
    + f"  {EXIT_GATE_FAILED}  the batch failed the gate (score --max-noise-rate / --min-label-accuracy)\n"
    + f"  {EXIT_INTERRUPTED} interrupted (Ctrl-C); a submitted job keeps running on the server\n"
    "errors are printed to stderr as `error: <CODE>: <message>`.\n"
    "environment: O2U_TARGET (default localhost:50051), O2U_TOKEN_FILE."
)


class Output:
    """Where results go: rich text for people, JSON for programs."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.console = make_console()

    def document(self, value: Any) -> None:
        print(json.dumps(to_json_dict(value), sort_keys=True))

    def show(self, value: RenderableType) -> None:
        self.console.print(value)

    def line(self, text: str) -> None:
        self.console.print(safe_text(text), markup=False)


Command = Callable[[argparse.Namespace, Client, Output], int]


def _exit_for(job: Job) -> int:
    return 0 if job.state in (JobState.SUCCEEDED, JobState.QUEUED, JobState.RUNNING) else EXIT_FAILED_JOB


def _config(args: argparse.Namespace) -> scoring_pb2.ScoringConfig:
    """The --config file's ScoringConfig (protobuf JSON, either field naming), with the flags on top."""
    config = scoring_pb2.ScoringConfig()
    if args.config_file is not None:
        try:
            loaded = json.loads(Path(args.config_file).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read --config {args.config_file}: {exc}") from exc
        try:
            config = config_from_json(loaded)
        except ValueError as exc:
            raise ValueError(f"--config {args.config_file}: {exc}") from None
    given = {option: getattr(args, option.field) for option in CONFIG_OPTIONS}
    flags = {option.field: option.value(value) for option, value in given.items() if value is not None}
    return build_config(config, **flags)


def cmd_score(args: argparse.Namespace, client: Client, out: Output) -> int:
    options = {
        "format": args.format,
        "display_name": args.display_name,
        "request_id": args.request_id,
        "webhook_url": args.webhook,
        "dataset_options": dataset_options(args),
    }
    gated = args.max_noise_rate is not None or args.min_label_accuracy is not None
    if args.no_wait and gated:
        raise ValueError(
            "the gate (--max-noise-rate / --min-label-accuracy) waits for the job: drop --no-wait"
        )
    if args.no_wait:
        job = client.submit(args.uri, config=_config(args), on_retry=_print_notice, **options)
        if out.json_mode:
            out.document(job)
        else:
            out.line(f"submitted {job.job_id} ({job.state.value}); follow it with: o2u watch {job.job_id}")
        return 0
    submitted: list[Job] = []

    def note(job: Job) -> None:
        submitted.append(job)
        if out.json_mode:  # stdout holds one document at the end; say at once which job it is about
            print(f"submitted {job.job_id} (request id {job.request_id})", file=sys.stderr, flush=True)

    try:
        outcome = score_dataset(
            client,
            args.uri,
            console=None if out.json_mode else out.console,
            config=_config(args),
            top=args.top,
            on_submitted=note,
            on_notice=_print_notice,
            **options,
        )
    except (O2UError, KeyboardInterrupt) as stopped:
        if not submitted:
            raise
        status = EXIT_INTERRUPTED
        if isinstance(stopped, O2UError):
            _print_error(stopped)
            status = stopped.exit_code
        # The job does not end with this command: name it, so a rerun follows it, not a duplicate.
        job_id = submitted[0].job_id
        print(
            f"{'interrupted: ' if status == EXIT_INTERRUPTED else ''}job {job_id} is on the server and "
            f"goes on without this command; follow it with: o2u watch {job_id}",
            file=sys.stderr,
        )
        return status
    if gated and outcome.summary is not None:
        return _gate(args, outcome.summary, out)
    if out.json_mode:
        out.document({"job": outcome.job, "summary": outcome.summary, "top_suspects": outcome.top_suspects})
    return 0 if outcome.succeeded else EXIT_FAILED_JOB


def _gate(args: argparse.Namespace, summary: DatasetSummary, out: Output) -> int:
    """Print the gate's verdict (one JSON object with --json) and exit 0 or EXIT_GATE_FAILED."""
    verdict = gate_verdict(
        summary, max_noise_rate=args.max_noise_rate, min_label_accuracy=args.min_label_accuracy
    )
    if out.json_mode:
        out.document({"job_id": summary.job_id, **dataclasses.asdict(verdict)})
    else:
        out.line(verdict.describe())
    return 0 if verdict.passed else EXIT_GATE_FAILED


def cmd_jobs(args: argparse.Namespace, client: Client, out: Output) -> int:
    jobs = client.list(state=args.state, owner=args.owner, page_size=args.page_size)
    if out.json_mode:
        for job in jobs:
            out.document(job)
    else:
        out.show(jobs_table(list(jobs)))
    return 0


def cmd_get(args: argparse.Namespace, client: Client, out: Output) -> int:
    job = client.get(args.job_id)
    if out.json_mode:
        out.document(job)
    else:
        out.show(job_details(job))
    return 0


def cmd_watch(args: argparse.Namespace, client: Client, out: Output) -> int:
    events = client.watch(args.job_id, after_sequence=args.after, on_connection=_print_notice)
    if out.json_mode:
        for event in events:
            out.document(event)
            sys.stdout.flush()
    else:
        with progress_display(out.console) as show:
            for event in events:
                show(event)
    return _exit_for(client.get(args.job_id))


def cmd_scores(args: argparse.Namespace, client: Client, out: Output) -> int:
    scores = client.scores(
        args.job_id,
        top_k=args.top_k,
        min_score=args.min_score,
        only_suspected=args.only_suspected,
        page_size=args.page_size,
    )
    if out.json_mode:
        for score in scores:
            out.document(score)
    else:
        out.show(suspects_table(scores, title="Noise scores"))
    return 0


def cmd_summary(args: argparse.Namespace, client: Client, out: Output) -> int:
    summary = client.summary(args.job_id)
    if out.json_mode:
        out.document(summary)
    else:
        out.show(summary_report(summary))
    return 0


def cmd_cancel(args: argparse.Namespace, client: Client, out: Output) -> int:
    job = client.cancel(args.job_id)
    if out.json_mode:
        out.document(job)
    else:
        out.line(f"{job.job_id}: {job.state.value}")
    return 0


def cmd_delete(args: argparse.Namespace, client: Client, out: Output) -> int:
    client.delete(args.job_id)
    if out.json_mode:
        out.document({"job_id": args.job_id, "deleted": True})
    else:
        out.line(f"deleted {args.job_id}")
    return 0


def cmd_export(args: argparse.Namespace, client: Client, out: Output) -> int:
    result = client.export(args.job_id, args.destination, args.format, only_suspected=args.only_suspected)
    if out.json_mode:
        out.document(result)
    else:
        out.line(
            f"wrote {result.rows_written:,} rows ({result.bytes_written:,} bytes) to {result.destination_uri}"
        )
    return 0


def cmd_health(args: argparse.Namespace, client: Client, out: Output) -> int:
    serving = client.healthy(args.service)
    if out.json_mode:
        out.document({"target": client.target, "serving": serving})
    else:
        out.line(f"{client.target}: {'SERVING' if serving else 'NOT SERVING'}")
    return 0 if serving else EXIT_CODES[grpc.StatusCode.UNAVAILABLE]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="o2u",
        description="Find mislabeled training samples with an o2u (O2U-Net) scoring server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_global_options(sub)
        sub.set_defaults(handler=handler)
        return sub

    score = command("score", cmd_score, "submit a dataset, show live progress, print the top suspects")
    score.add_argument("uri", help="dataset URI: s3://bucket/key or file:///path under a server data root")
    score.add_argument("--format", choices=DATASET_FORMATS)
    score.add_argument("--display-name", default="")
    score.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    score.add_argument(
        "--webhook", metavar="URL", help="https URL (on the server's allow-list) to notify when the job ends"
    )
    score.add_argument("--top", type=int, default=10, metavar="N", help="suspects to print (default 10)")
    score.add_argument("--no-wait", action="store_true", help="submit and print the job id without waiting")
    score.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        help="JSON object of ScoringConfig fields in protobuf's JSON form (pretrain_epochs or "
        'pretrainEpochs, "seed": "7", enums by name); flags override it',
    )
    score.add_argument(
        "--max-noise-rate",
        type=_fraction,
        metavar="R",
        help=f"gate: exit {EXIT_GATE_FAILED} if the noise rate is above R",
    )
    score.add_argument(
        "--min-label-accuracy",
        type=_fraction,
        metavar="A",
        help=f"gate: exit {EXIT_GATE_FAILED} if the label accuracy is below A",
    )
    add_dataset_options(score)
    add_config_options(score)

    jobs = command("jobs", cmd_jobs, "list jobs, newest first")
    jobs.add_argument(
        "--state", type=str.upper, choices=[s.value for s in JobState if s != JobState.UNSPECIFIED]
    )
    jobs.add_argument(
        "--owner",
        default="",
        metavar="PRINCIPAL",
        help="one principal's jobs (admins; others see only their own)",
    )
    jobs.add_argument("--page-size", type=int, default=0)
    command("get", cmd_get, "show one job").add_argument("job_id")
    watch = command(
        "watch",
        cmd_watch,
        "follow a job's events until it finishes, reconnecting through server restarts "
        "(see --reconnect-window)",
    )
    watch.add_argument("job_id")
    watch.add_argument(
        "--after", type=int, default=0, metavar="SEQUENCE", help="replay events after SEQUENCE"
    )
    scores = command("scores", cmd_scores, "list a finished job's noise scores, most suspicious first")
    scores.add_argument("job_id")
    scores.add_argument("--top-k", type=int, default=0, help="only the K most suspicious (0 = all)")
    scores.add_argument("--min-score", type=float, help="only scores >= this")
    scores.add_argument("--only-suspected", action="store_true")
    scores.add_argument("--page-size", type=int, default=0)
    command("summary", cmd_summary, "dataset health of a finished job").add_argument("job_id")
    command("cancel", cmd_cancel, "stop a queued or running job").add_argument("job_id")
    command("delete", cmd_delete, "delete a finished job and its results").add_argument("job_id")
    export = command("export", cmd_export, "write a finished job's scores as JSONL, CSV or Parquet")
    export.add_argument("job_id")
    export.add_argument(
        "destination", help="a new s3://bucket/key.jsonl or file:///path.csv under a server export location"
    )
    export.add_argument("--format", choices=EXPORT_FORMATS, help="default: from the extension")
    export.add_argument("--only-suspected", action="store_true")
    health = command("health", cmd_health, "check the server's health (exit 0 iff SERVING)")
    health.add_argument("--service", default="", help="health service name (default: the whole server)")
    return parser


# Codes of a failed submission that may have created the job anyway (its answer was lost or late).
_OUTCOME_UNKNOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def _print_notice(line: str) -> None:
    """A watch's word that it lost the server or has it back, or a submit's that it waits out a full
    queue: stderr, so stdout stays the output."""
    print(f"notice: {safe_text(line)}", file=sys.stderr, flush=True)


def _print_error(error: O2UError) -> None:
    print(f"error: {error.code.name}: {safe_text(error.message)}", file=sys.stderr)
    for violation in error.field_violations:
        # The server repeats the message, shortened, as the violation's description.
        repeated = error.message.startswith(violation.description.removesuffix("..."))
        detail = "" if repeated else f": {safe_text(violation.description)}"
        print(f"  field {safe_text(violation.field)}{detail}", file=sys.stderr)
    if error.request_id and error.code in _OUTCOME_UNKNOWN:
        print(
            f"  request id {error.request_id}: the job may exist; rerun with --request-id "
            f"{error.request_id} to get it instead of a second one",
            file=sys.stderr,
        )


def _check_transport(args: argparse.Namespace) -> None:
    """Refuse connection options that would not do what they say, naming the CLI's flags."""
    tls = bool(args.tls or args.ca_cert or args.client_cert)
    if args.server_name and not tls:
        raise ValueError("--server-name is the TLS server name to verify: it needs --tls or --ca-cert")
    check_token_transport(
        args.target,
        tls=tls,
        token_configured=bool(args.token_file),
        allowed=args.allow_plaintext_token,
        opt_in="--allow-plaintext-token",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on a usage error and 0 after --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    global_defaults(args)
    out = Output(args.json)
    try:
        _check_transport(args)
        with Client(
            args.target,
            timeout=args.timeout,
            tls=args.tls,
            root_certificates=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.server_name,
            token_file=args.token_file or None,
            allow_plaintext_token=args.allow_plaintext_token,
            # A CLI should fail fast (UNAVAILABLE) when nothing listens, not wait for the timeout;
            # a watch that has reached the server rides out its restarts (the job goes on there).
            wait_for_ready=False,
            watch_reconnect_window=args.reconnect_window,
        ) as client:
            handler: Command = args.handler
            return handler(args, client, out)
    except O2UError as error:
        _print_error(error)
        return error.exit_code
    except (ValueError, TypeError) as exc:
        print(f"error: {safe_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted (a submitted job keeps running on the server)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
