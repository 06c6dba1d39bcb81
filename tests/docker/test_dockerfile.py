"""Checks on the Dockerfile that need no Docker engine: the file is parsed instruction by
instruction and compared with pyproject.toml, the Makefile (the install commands CI runs) and the
server settings, so the image cannot drift from the project it packages."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from o2u_server import healthcheck
from o2u_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = "/var/lib/o2u"


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    arguments: str  # the rest of the (continuation-joined) line


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions (comments dropped, continuations joined)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        arguments = " ".join(arguments.split())
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif keyword == "ARG" and not stages:
            continue  # global build arguments precede the first FROM
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for item in shlex.split(instruction.arguments):
            key, sep, value = item.partition("=")
            assert sep, f"ENV without key=value form: {instruction.arguments}"
            env[key] = value
    return env


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_versions(requirements: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", requirement.replace(" ", ""))
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def settings_ports() -> tuple[int, int]:
    listen = Settings.model_fields["listen_address"].default
    metrics = Settings.model_fields["metrics_port"].default
    assert isinstance(listen, str)
    assert isinstance(metrics, int)
    return int(listen.rsplit(":", 1)[1]), metrics


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def builder(stages: list[Stage]) -> Stage:
    return next(s for s in stages if s.name == "builder")


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_parser_understands_stages_and_continuations() -> None:
    parsed = parse_dockerfile("ARG X=1\nFROM a AS one\nRUN echo \\\n  hi\n# note\nFROM b\nUSER 5\n")
    assert [(s.base, s.name) for s in parsed] == [("a", "one"), ("b", None)]
    assert parsed[0].instructions == [Instruction("RUN", "echo hi")]
    assert parsed[1].last("USER").arguments == "5"


def test_multi_stage_build_copies_only_the_virtualenv(stages: list[Stage], runtime: Stage) -> None:
    assert len(stages) >= 2
    assert runtime.name == "runtime"
    assert runtime.base == stages[0].base, "builder and runtime must share the Python build"
    copies = [c.arguments for c in runtime.all("COPY")]
    assert copies == ["--from=builder /opt/o2u /opt/o2u"]
    assert not any("pip install" in r.arguments for r in runtime.all("RUN"))


def test_torch_pins_match_pyproject_and_the_ci_install_command(builder: Stage) -> None:
    dependencies = pyproject()["project"]
    assert isinstance(dependencies, dict)
    pins = pinned_versions(list(dependencies["dependencies"]))
    expected = f"pip install torch=={pins['torch']} torchvision=={pins['torchvision']}"
    runs = [r.arguments for r in builder.all("RUN")]
    assert any(expected in run for run in runs), f"no RUN with `{expected}` in the builder stage"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(
        rf"pip install (-q )?torch=={re.escape(pins['torch'])} torchvision=={re.escape(pins['torchvision'])}",
        makefile,
    ), "the Makefile (what CI runs) installs different torch pins than the Dockerfile"


def test_project_is_installed_after_torch_from_copied_sources(builder: Stage) -> None:
    runs = [r.arguments for r in builder.all("RUN")]
    torch_index = next(i for i, run in enumerate(runs) if "pip install torch==" in run)
    project_index = next(i for i, run in enumerate(runs) if re.search(r"pip install \.( |$)", run))
    assert torch_index < project_index
    sources: list[str] = []
    for copy in builder.all("COPY"):
        words = copy.arguments.split()
        sources += [w for w in words[:-1] if not w.startswith("--")]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    setuptools = pyproject()["tool"]
    assert isinstance(setuptools, dict)
    package_dirs = setuptools["setuptools"]["package-dir"].values()
    for package_dir in package_dirs:
        assert any(package_dir == s or package_dir.startswith(s.rstrip("/") + "/") for s in sources), (
            f"package folder {package_dir} is not copied into the build"
        )
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in dockerignore if line.startswith("!")}
    assert set(sources) <= allowed, "a copied path is excluded by .dockerignore"


def test_runs_as_uid_1000(runtime: Stage) -> None:
    user = runtime.last("USER").arguments
    assert user.split(":")[0] == "1000", f"USER {user} must be uid 1000 (numeric, for runAsNonRoot)"
    assert any("useradd --uid 1000" in r.arguments for r in runtime.all("RUN"))


def test_exposed_ports_match_settings_defaults(runtime: Stage) -> None:
    grpc_port, metrics_port = settings_ports()
    exposed = {int(p.split("/")[0]) for e in runtime.all("EXPOSE") for p in e.arguments.split()}
    assert exposed == {grpc_port, metrics_port}
    env = env_of(runtime)
    assert env["O2U_LISTEN_ADDRESS"].rsplit(":", 1)[1] == str(grpc_port)
    assert env["O2U_METRICS_PORT"] == str(metrics_port)


def test_environment_is_valid_server_settings(runtime: Stage, monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of(runtime)
    o2u_env = {k: v for k, v in env.items() if k.startswith("O2U_")}
    fields = set(Settings.model_fields)
    for name in o2u_env:
        assert name.removeprefix("O2U_").lower() in fields, f"{name} is not a server setting"
    monkeypatch.delenv("O2U_CONFIG_FILE", raising=False)
    for name in [k for k in os.environ if k.startswith("O2U_")]:
        monkeypatch.delenv(name)
    for name, value in o2u_env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert str(settings.state_dir) == STATE_DIR
    assert settings.metrics_address == "0.0.0.0"


def test_only_the_state_dir_is_writable(runtime: Stage) -> None:
    volumes = [json.loads(v.arguments) for v in runtime.all("VOLUME")]
    assert volumes == [[STATE_DIR]]
    owned = re.findall(
        r"install -d -o 1000 -g 1000 -m \d+ (\S+)", " ".join(r.arguments for r in runtime.all("RUN"))
    )
    assert owned == [STATE_DIR]
    assert runtime.last("WORKDIR").arguments == STATE_DIR
    env = env_of(runtime)
    assert env["O2U_STATE_DIR"] == STATE_DIR
    # Every cache location points under /tmp, the one other writable path.
    for name in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME"):
        assert env[name].startswith("/tmp"), name


def test_tini_is_pid_1_and_runs_the_server(runtime: Stage) -> None:
    assert any(re.search(r"apt-get install .*\btini\b", r.arguments) for r in runtime.all("RUN"))
    assert json.loads(runtime.last("ENTRYPOINT").arguments) == ["/usr/bin/tini", "--"]
    command = json.loads(runtime.last("CMD").arguments)
    scripts = pyproject()["project"]
    assert isinstance(scripts, dict)
    assert command[0] in scripts["scripts"], f"CMD {command[0]} is not a console script of the project"


def test_healthcheck_calls_the_grpc_health_command(runtime: Stage) -> None:
    instruction = runtime.last("HEALTHCHECK").arguments
    options, _, command_text = instruction.partition(" CMD ")
    assert command_text, "HEALTHCHECK must use CMD"
    command = json.loads(command_text)
    assert command[0] == "o2u-healthcheck"
    scripts = pyproject()["project"]
    assert isinstance(scripts, dict)
    assert scripts["scripts"]["o2u-healthcheck"] == "o2u_server.healthcheck:main"
    address = command[command.index("--address") + 1]
    assert int(address.rsplit(":", 1)[1]) == settings_ports()[0]
    assert "--start-period=" in options
    # The real command accepts these arguments: against a port where nothing listens it reports
    # "not serving" (1), where a usage error would exit 2.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        command[command.index("--address") + 1] = f"127.0.0.1:{unused.getsockname()[1]}"
        assert healthcheck.main(command[1:]) == 1
