"""The Go client module (client/go): compiled offline in GOPATH mode against Debian's Go packages,
gofmt- and vet-clean, its unit tests passing (the client's and the example's), and its example
command run against a live server on loopback - a small digits job submitted, progress printed in
order, the top-k suspects listed, a finished job followed from its last event - plus typed errors,
TLS, mutual TLS, bearer tokens and tenants (a tokens file: each principal sees only its own jobs,
an admin every job) seen through the example's output.

Without a Go toolchain the tests skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from o2u_client import Client, JobState
from tests.o2u_server.tls_material import Pki, make_pki
from tests.server_testing import TINY_CONFIG, RunningServer, running_server, test_settings, write_noisy_digits
from tests.webhook_receiver import SECRET, Receiver, verify

ROOT = Path(__file__).resolve().parents[2]
GO_MODULE_DIR = ROOT / "client" / "go"
SYSTEM_GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages install sources
MISSING_JOB = "job-" + "0" * 32
TOKEN = "go-client-token-0123456789"
APT = "golang-go golang-google-grpc-dev golang-google-protobuf-dev"


@dataclass(frozen=True)
class GoBuild:
    env: dict[str, str]
    package_dir: Path  # the module as seen inside the temporary GOPATH
    example: Path  # the built o2u-example binary


def _require_go() -> str:
    go = shutil.which("go")
    missing = None
    if go is None:
        missing = "the Go toolchain is not installed"
    elif not (SYSTEM_GOPATH / "src" / "google.golang.org" / "grpc").is_dir():
        missing = f"grpc-go sources are missing under {SYSTEM_GOPATH}"
    if missing is not None:
        message = f"{missing} (apt-get install {APT})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must run the Go client tests")
        pytest.skip(message)
    assert go is not None
    return go


def go_build_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Go build cache for the whole test session: grpc-go compiles once (about 15 s cold), not
    once per test that builds Go code. The cache is keyed by content, so sharing it is safe."""
    cache = tmp_path_factory.getbasetemp() / "go-build-cache"
    cache.mkdir(exist_ok=True)
    return cache


def _go(build: GoBuild, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["go", *args], cwd=build.package_dir, env=build.env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"go {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def go_build(tmp_path_factory: pytest.TempPathFactory) -> GoBuild:
    """The module linked into a fresh GOPATH as o2u.dev/o2u, and the example built from it."""
    _require_go()
    gopath = tmp_path_factory.mktemp("gopath")
    package_dir = gopath / "src" / "o2u.dev" / "o2u"
    package_dir.parent.mkdir(parents=True)
    package_dir.symlink_to(GO_MODULE_DIR, target_is_directory=True)
    env = {
        **os.environ,
        "GO111MODULE": "off",  # offline: dependencies come from the Debian packages, not a proxy
        "GOPATH": f"{gopath}{os.pathsep}{SYSTEM_GOPATH}",
        "GOCACHE": str(go_build_cache(tmp_path_factory)),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
        # Go resolves ./... from $PWD; it must name the link, not the resolved module folder.
        "PWD": str(package_dir),
    }
    build = GoBuild(env=env, package_dir=package_dir, example=gopath / "bin" / "o2u-example")
    _go(build, "build", "-o", str(build.example), "./cmd/o2u-example")
    return build


def test_module_is_gofmt_and_vet_clean(go_build: GoBuild) -> None:
    unformatted = subprocess.run(
        ["gofmt", "-l", "."],
        cwd=go_build.package_dir,
        env=go_build.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert unformatted == "", f"gofmt would change: {unformatted}"
    packages = _go(go_build, "list", "./...").stdout.split()
    assert packages == ["o2u.dev/o2u/cmd/o2u-example", "o2u.dev/o2u/gen/o2u/v1", "o2u.dev/o2u/o2u"]
    _go(go_build, "vet", "./...")


def test_go_unit_tests_pass(go_build: GoBuild) -> None:
    result = _go(go_build, "test", "-count=1", "-v", "./o2u/", "./cmd/o2u-example/")
    passed = set(re.findall(r"^--- PASS: (\w+)", result.stdout, re.MULTILINE))
    # The retry, reconnect, keepalive, paging and balancing tests run against scripted servers on
    # loopback (a late or lost answer, a connection gone silent behind a proxy).
    assert {
        "TestWatchReconnectsFromTheLastSequence",
        "TestFromStatusUnpacksEveryDetail",
        "TestCallsAreBalancedOverEveryResolvedAddress",
        "TestSubmitRetriesALateAnswerWithTheSameRequestID",
        "TestAFailedSubmitCarriesItsRequestID",
        "TestCallsThatAreSafeToRepeatRetryUnavailable",
        "TestWatchOfAFinishedJobPastItsLastEventEndsAtOnce",
        "TestServerNameNeedsTLS",
        "TestKeepaliveIsOnByDefault",
        "TestWatchResumesAfterItsConnectionGoesSilent",
        "TestSafeTextEscapesWhatWouldActAndKeepsTheRest",
        "TestEventsAndErrorsPrintHostileTextEscaped",
    } <= passed
    assert "--- FAIL" not in result.stdout


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("go-data")


@pytest.fixture(scope="module")
def digits_flipped(data_root: Path) -> np.ndarray:
    return write_noisy_digits(data_root / "digits.npz")


@pytest.fixture(scope="module")
def server(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    settings = test_settings(state_dir=tmp_path_factory.mktemp("go-state"), data_roots=[data_root])
    with running_server(settings) as running:
        yield running


def _example(go_build: GoBuild, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(go_build.example), *args, "-timeout", "100s"], capture_output=True, text=True, timeout=120
    )


# Stages without epochs (loading, ranking) print only the fraction done.
PROGRESS = re.compile(
    r"^progress seq=(?P<seq>\d+) stage=(?P<stage>\w+)(?: epoch=(?P<epoch>\d+)/(?P<total>\d+))? "
    r"done=(?P<done>[\d.]+)%(?: loss=\S+ lr=\S+ samples/s=\S+ eta=\S+s)?"
    r"(?: read=(?P<bytes>\d+)B files=(?P<files>\d+))?$"
)
STATE = re.compile(r"^state seq=(?P<seq>\d+) (?P<state>[A-Z]+)")
STAGES = ["loading", "pretraining", "cyclic", "clean_retraining", "ranking"]
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_example_scores_a_dataset(
    go_build: GoBuild, server: RunningServer, data_root: Path, digits_flipped: np.ndarray
) -> None:
    uri = (data_root / "digits.npz").as_uri()
    result = _example(
        go_build,
        *("-target", server.address, "-uri", uri, "-top", "5", "-page-size", "2"),
        *("-model", "mlp", "-seed", "0", "-pretrain-epochs", "3", "-cycle-length", "2", "-num-cycles", "2"),
        *("-batch-size", "32"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()

    submitted = re.fullmatch(r"submitted job (job-[0-9a-f]{32}) \(request id (\S+)\) for (\S+)", lines[0])
    assert submitted is not None, lines[0]
    assert UUID4.match(submitted.group(2))
    assert submitted.group(3) == uri

    events = [(m.group("seq"), m) for line in lines if (m := PROGRESS.match(line) or STATE.match(line))]
    sequences = [int(seq) for seq, _ in events]
    assert sequences == sorted(set(sequences)), sequences
    assert sequences[0] == 1
    progress = [m for _, m in events if m.re is PROGRESS]
    loading = [m for m in progress if m["stage"] == "loading"]
    assert loading, "LOADING progress reaches Go callers"
    assert (int(loading[-1]["files"]), int(loading[-1]["bytes"]) > 0) == (1, True)
    stage_epochs = [(STAGES.index(m["stage"]), int(m["epoch"] or 0)) for m in progress]
    assert stage_epochs == sorted(stage_epochs), "stages and epochs must arrive in order"
    trained = [(m["stage"], int(m["epoch"]), int(m["total"])) for m in progress if m["total"] is not None]
    assert [t for t in trained if t[0] == "pretraining"] == [("pretraining", e, 3) for e in (1, 2, 3)]
    assert [t for t in trained if t[0] == "cyclic"] == [("cyclic", e, 4) for e in (1, 2, 3, 4)]
    done = [float(m["done"]) for m in progress]
    assert done == sorted(done)
    assert done[-1] == pytest.approx(100.0)
    states = [m["state"] for _, m in events if m.re is STATE]
    assert "RUNNING" in states
    assert states[-1] == "SUCCEEDED", states

    assert any(re.fullmatch(rf"job {submitted.group(1)} succeeded in [\d.]+s", line) for line in lines)
    assert any(
        re.match(r"400 samples, 10 classes, model mlp on cpu; estimated noise rate", line) for line in lines
    )
    assert any(re.fullmatch(r"dataset digest [0-9a-f]{64}", line) for line in lines)
    table_start = lines.index("top 5 suspects:")
    assert lines[table_start + 1].split() == [
        "rank", "sample", "key", "given", "suggested", "confidence", "score", "p(noise)"
    ]  # fmt: skip
    rows = [line.split() for line in lines[table_start + 2 :]]
    assert [int(row[0]) for row in rows] == [1, 2, 3, 4, 5], rows
    sample_ids = [int(row[1]) for row in rows]
    assert len(set(sample_ids)) == 5
    assert all(0 <= s < 400 for s in sample_ids)
    assert all(re.fullmatch(r"digit-\d{4}", row[2]) and re.fullmatch(r"\d:\w+", row[3]) for row in rows)
    scores = [float(row[6]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    # Even this short run ranks mostly flipped labels first.
    assert len(set(sample_ids) & set(digits_flipped.tolist())) >= 3, (sample_ids, digits_flipped)


def test_example_reports_typed_errors(go_build: GoBuild, server: RunningServer) -> None:
    missing = _example(go_build, "-target", server.address, "-job", MISSING_JOB)
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert (
        f"error: code=NotFound reason=JOB_NOT_FOUND message=\"scoring job '{MISSING_JOB}'" in missing.stderr
    )
    assert f"resource scoring_job {MISSING_JOB}" in missing.stderr

    malformed = _example(go_build, "-target", server.address, "-job", "not-a-job")
    assert malformed.returncode == 1
    assert "error: code=InvalidArgument reason=INVALID_JOB_ID" in malformed.stderr
    assert "  field job_id: " in malformed.stderr

    outside = _example(go_build, "-target", server.address, "-uri", "file:///etc/hostname")
    assert outside.returncode == 1
    assert "error: code=PermissionDenied reason=PATH_OUTSIDE_DATA_ROOTS" in outside.stderr

    # A TLS server name without TLS would be ignored: refused before any call.
    named = _example(go_build, "-target", server.address, "-job", MISSING_JOB, "-server-name", "o2u.internal")
    assert named.returncode == 1
    assert "the connection is not TLS" in named.stderr


def test_example_follows_a_finished_job_from_its_last_event(
    go_build: GoBuild, server: RunningServer, data_root: Path
) -> None:
    with Client(server.address, timeout=20.0) as client:
        job = client.submit((data_root / "digits.npz").as_uri(), config=TINY_CONFIG)
        events = list(client.watch(job.job_id))
    assert events[-1].state == JobState.SUCCEEDED
    final = events[-1].sequence
    # The server ends the stream at once with OK: nothing follows the final event.
    result = _example(
        go_build, "-target", server.address, "-job", job.job_id, "-after", str(final), "-top", "2"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(PROGRESS.match(line) or STATE.match(line) for line in result.stdout.splitlines())
    assert re.search(rf"^job {job.job_id} succeeded in [\d.]+s$", result.stdout, re.MULTILINE)
    assert "top 2 suspects:" in result.stdout


@pytest.fixture(scope="module")
def secure_server(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningServer, Pki]]:
    """A server that requires TLS, a client certificate from its CA, and a bearer token."""
    folder = tmp_path_factory.mktemp("go-tls")
    pki = make_pki(folder / "pki")
    (folder / "token").write_text(TOKEN + "\n")
    settings = test_settings(
        state_dir=folder / "state",
        data_roots=[data_root],
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_cert,
        auth_token_file=folder / "token",
    )
    with running_server(settings) as running:
        yield running, pki


def test_example_speaks_mutual_tls_with_a_token(
    go_build: GoBuild, secure_server: tuple[RunningServer, Pki], tmp_path: Path
) -> None:
    server, pki = secure_server
    target = ("-target", f"localhost:{server.port}", "-job", MISSING_JOB)
    mtls = ("-ca", str(pki.ca_cert), "-cert", str(pki.client_cert), "-key", str(pki.client_key))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    wrong_token = tmp_path / "wrong-token"
    wrong_token.write_text("not-the-token")

    # Through TLS, the client certificate and the token, the call reaches the service: NotFound.
    accepted = _example(go_build, *target, *mtls, "-token-file", str(token_file))
    assert "error: code=NotFound reason=JOB_NOT_FOUND" in accepted.stderr, accepted.stderr

    no_token = _example(go_build, *target, *mtls)
    assert "error: code=Unauthenticated reason=MISSING_CREDENTIALS" in no_token.stderr, no_token.stderr
    bad_token = _example(go_build, *target, *mtls, "-token-file", str(wrong_token))
    assert "error: code=Unauthenticated reason=INVALID_CREDENTIALS" in bad_token.stderr, bad_token.stderr

    # Without the client certificate, or trusting another CA, the handshake fails (UNAVAILABLE,
    # which the client would retry; -retries 0 keeps the test short).
    once = (*target, "-retries", "0")
    no_cert = _example(go_build, *once, "-ca", str(pki.ca_cert), "-token-file", str(token_file))
    assert no_cert.returncode == 1
    assert "code=Unavailable" in no_cert.stderr, no_cert.stderr
    wrong_ca = _example(
        go_build, *once, "-ca", str(pki.other_ca_cert), "-cert", str(pki.client_cert), "-key",
        str(pki.client_key), "-token-file", str(token_file),
    )  # fmt: skip
    assert wrong_ca.returncode == 1
    assert "code=Unavailable" in wrong_ca.stderr, wrong_ca.stderr

    # A token is never sent in the clear unless asked for.
    plaintext = _example(
        go_build, "-target", server.address, "-job", MISSING_JOB, "-token-file", str(token_file)
    )
    assert plaintext.returncode == 1
    assert "bearer token needs TLS" in plaintext.stderr


def test_example_submits_a_completion_webhook(
    go_build: GoBuild,
    server: RunningServer,
    data_root: Path,
    digits_flipped: np.ndarray,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    uri = (data_root / "digits.npz").as_uri()
    tiny = ("-model", "mlp", "-seed", "0", "-pretrain-epochs", "2", "-cycle-length", "2", "-num-cycles", "1")
    disabled = _example(go_build, "-target", server.address, "-uri", uri, *tiny, "-webhook", receiver.url)
    assert disabled.returncode == 1
    assert "error: code=FailedPrecondition reason=WEBHOOKS_DISABLED" in disabled.stderr
    secret = tmp_path / "webhook-secret"
    secret.write_bytes(SECRET)
    settings = test_settings(
        state_dir=tmp_path / "state",
        data_roots=[data_root],
        webhook_allowed_urls=[receiver.url],
        webhook_secret_file=secret,
        webhook_allow_http_loopback=True,
    )
    with running_server(settings) as hooked:
        result = _example(go_build, "-target", hooked.address, "-uri", uri, *tiny, "-webhook", receiver.url)
        assert result.returncode == 0, result.stdout + result.stderr
        submitted = re.match(r"submitted job (job-[0-9a-f]{32})", result.stdout)
        assert submitted is not None
        deadline = time.monotonic() + 30
        while not receiver.received:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    headers, body = receiver.received[0]
    assert verify(SECRET, headers["o2u-signature"], body)
    assert json.loads(body)["subject"] == submitted.group(1)


def test_example_gates_the_batch(go_build: GoBuild, server: RunningServer, data_root: Path) -> None:
    uri = (data_root / "digits.npz").as_uri()
    job_flags = (
        "-model",
        "mlp",
        "-seed",
        "0",
        "-pretrain-epochs",
        "2",
        "-cycle-length",
        "2",
        "-num-cycles",
        "1",
    )
    common = ("-target", server.address, "-uri", uri, "-top", "0", *job_flags)
    passed = _example(go_build, *common, "-max-noise-rate", "1")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    line = passed.stdout.splitlines()[-1]
    match = re.fullmatch(
        r"gate PASSED: label accuracy ([\d.]+)% \(95% interval ([\d.]+)%-([\d.]+)%\), noise rate [\d.]+%",
        line,
    )
    assert match is not None, line
    accuracy, lower, upper = (float(g) for g in match.groups())
    assert lower <= accuracy <= upper
    failed = _example(go_build, *common, "-min-label-accuracy", "0.9999")
    assert failed.returncode == 20, failed.stdout + failed.stderr
    assert "gate FAILED" in failed.stdout
    assert "is below the minimum 99.99%" in failed.stdout
    bad = _example(go_build, *common, "-max-noise-rate", "2")
    assert bad.returncode == 2


def test_example_keeps_tenants_apart(
    go_build: GoBuild, data_root: Path, digits_flipped: np.ndarray, tmp_path: Path
) -> None:
    """Two principals from a tokens file: each sees only its own jobs, an admin sees both."""
    tokens = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789", "ops": "ops-token-0123456789"}
    (tmp_path / "tokens").write_text("".join(f"{name}: {token}\n" for name, token in tokens.items()))
    for name, token in tokens.items():
        (tmp_path / f"{name}.token").write_text(token)
    settings = test_settings(
        state_dir=tmp_path / "state",
        data_roots=[data_root],
        tokens_file=tmp_path / "tokens",
        admin_principals=["ops"],
    )
    uri = (data_root / "digits.npz").as_uri()
    tiny = ("-model", "mlp", "-seed", "0", "-pretrain-epochs", "2", "-cycle-length", "2", "-num-cycles", "1")
    with running_server(settings) as tenants:

        def as_(name: str, *args: str) -> subprocess.CompletedProcess[str]:
            token = ("-token-file", str(tmp_path / f"{name}.token"), "-plaintext-token")
            return _example(go_build, "-target", tenants.address, *token, "-top", "1", *args)

        submitted = as_("alice", "-uri", uri, *tiny)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        found = re.match(r"submitted job (job-[0-9a-f]{32})", submitted.stdout)
        assert found is not None
        job_id = found.group(1)

        other = as_("bob", "-job", job_id)
        assert other.returncode == 1, other.stdout + other.stderr
        assert f"error: code=NotFound reason=JOB_NOT_FOUND message=\"scoring job '{job_id}'" in other.stderr
        for name in ("alice", "ops"):  # the owner, and an admin
            followed = as_(name, "-job", job_id)
            assert followed.returncode == 0, followed.stdout + followed.stderr
            assert f"job {job_id} succeeded" in followed.stdout
        anonymous = _example(go_build, "-target", tenants.address, "-job", job_id)
        assert "error: code=Unauthenticated reason=MISSING_CREDENTIALS" in anonymous.stderr, anonymous.stderr
