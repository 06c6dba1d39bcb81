"""A real HTTP receiver on loopback for Label Studio's task import (`label_studio` fixture), answering
as Label Studio's API documents it: `POST /api/projects/{id}/import` with `Authorization: Token
<token>` and a JSON list of tasks, checked against the task import schema that
tests/o2u_server/datasets keeps; 201 with the import's counts (`task_count`, `annotation_count`,
`prediction_count`, `duration`, `file_upload_ids`, `could_be_tasks_list`, `found_formats`,
`data_columns`), 401 for a missing or wrong token, 404 for an unknown project, 400 with a `detail`
for a body that is not a list of tasks. It keeps every import it accepted, for the test to read."""

from __future__ import annotations

import http.server
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.webhook_receiver import serve_loopback

__all__ = ["TOKEN", "Import", "LabelStudio", "label_studio", "serve_label_studio"]

TOKEN = "label-studio-test-token"
SCHEMA = json.loads(
    (Path(__file__).parent / "o2u_server" / "datasets" / "label_studio_task_import.schema.json").read_text()
)
_IMPORT_PATH = re.compile(r"/api/projects/(\d+)/import")


@dataclass(frozen=True)
class Import:
    """One accepted import: the project and the tasks as posted."""

    project: int
    tasks: list[dict[str, Any]]
    content_type: str


@dataclass
class LabelStudio:
    """The projects this receiver knows, the token it accepts, and the imports it accepted."""

    projects: frozenset[int]
    token: str
    imports: list[Import] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def label_studio() -> Iterator[LabelStudio]:
    with serve_label_studio() as state:
        yield state


@contextmanager
def serve_label_studio(
    projects: frozenset[int] = frozenset({1}), token: str = TOKEN
) -> Iterator[LabelStudio]:
    """A receiver on a free loopback port that holds `projects` and accepts `token`."""
    state = LabelStudio(projects=projects, token=token)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            started = time.monotonic()
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, answer = self._import(body)
            if status == 201:
                answer["duration"] = time.monotonic() - started
            self._answer(status, answer)

        def _import(self, body: bytes) -> tuple[int, dict[str, Any]]:
            route = _IMPORT_PATH.fullmatch(self.path.split("?", 1)[0])
            if route is None:
                return 404, {"detail": "Not found."}
            # As Label Studio (Django REST framework) does: the token is checked before the project.
            authorization = self.headers.get("Authorization")
            if authorization is None:
                return 401, {"detail": "Authentication credentials were not provided."}
            if authorization != f"Token {state.token}":
                return 401, {"detail": "Invalid token."}
            project = int(route.group(1))
            if project not in state.projects:
                return 404, {"detail": "Not found."}
            content_type = self.headers.get("Content-Type", "")
            try:
                if content_type.split(";", 1)[0].strip() != "application/json":
                    raise ValueError(f"expected Content-Type application/json, got {content_type!r}")
                tasks = json.loads(body)
                jsonschema.validate(tasks, SCHEMA)
                if not tasks:
                    raise ValueError("no tasks added")
            except (ValueError, jsonschema.ValidationError) as error:
                message = error.message if isinstance(error, jsonschema.ValidationError) else str(error)
                return 400, {"detail": f"Validation error: {message}"}
            state.imports.append(Import(project, tasks, content_type))
            return 201, {
                "task_count": len(tasks),
                "annotation_count": sum(len(task.get("annotations", [])) for task in tasks),
                "prediction_count": sum(len(task.get("predictions", [])) for task in tasks),
                "duration": 0.0,  # set once the answer is ready
                # A JSON body is no uploaded file: Label Studio answers these empty for it.
                "file_upload_ids": [],
                "could_be_tasks_list": False,
                "found_formats": [],
                "data_columns": [],
            }

        def _answer(self, status: int, answer: dict[str, Any]) -> None:
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Token")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    with serve_loopback(Handler) as port:
        state.port = port
        yield state
