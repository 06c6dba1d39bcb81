"""The server's packages import in one direction (docs/architecture.md): api -> jobs -> datasets ->
storage -> the top-level settings, domain, errors and text. Only jobs/engine.py (and main.py, for the CPU
threads) imports the engine, and only the api package, app.py and healthcheck.py import grpc."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import o2u_server

ROOT = Path(o2u_server.__file__).parent
# Which rooms a room may import from (a room: a sub-package, or a top-level module).
ALLOWED = {
    "storage": {"errors", "settings", "text"},
    "datasets": {"errors", "settings", "domain", "storage", "text"},
    "jobs": {"errors", "settings", "domain", "metrics", "storage", "datasets", "text", "principals"},
    "api": {"errors", "settings", "domain", "metrics", "jobs", "text", "principals"},
    "__init__": set(),
    "errors": set(),
    "text": set(),
    "domain": set(),
    "principals": set(),
    "settings": set(),
    "metrics": {"domain"},
    "healthcheck": set(),
    "main": {"__init__", "settings", "api", "app"},
}
ENGINE_IMPORTERS = {"jobs/engine.py", "main.py"}
GRPC_ROOMS = {"api", "app", "healthcheck"}


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def _room(path: Path) -> str:
    relative = path.relative_to(ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _imported_room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    room = _room(path)
    if room == "app":
        return  # the composition root wires every room together
    imported = {_imported_room(name) for name in _imports(path) if name.split(".")[0] == "o2u_server"}
    assert imported - {room} <= ALLOWED[room], f"{path.relative_to(ROOT)} imports {sorted(imported)}"


def test_only_the_engine_boundary_imports_the_engine_and_only_the_api_imports_grpc() -> None:
    engine, grpc = set(), set()
    for path in _modules():
        roots = {name.split(".")[0] for name in _imports(path)}
        if "o2u_engine" in roots:
            engine.add(str(path.relative_to(ROOT)))
        if "grpc" in roots:
            grpc.add(_room(path))
    assert engine == ENGINE_IMPORTERS
    assert grpc <= GRPC_ROOMS
