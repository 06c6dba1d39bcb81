"""A real HTTP receiver for completion webhooks on loopback (`receiver` fixture), answering each POST
as planned, and the signature check a receiver makes (the one docs/api.md shows); `serve_loopback`
runs any request handler the same way (tests/label_studio_receiver.py uses it too)."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = ["SECRET", "Receiver", "receiver", "serve_loopback", "serve_receiver", "verify"]

SECRET = b"webhook-test-secret"


@dataclass
class Receiver:
    """An HTTP server that answers each POST with the next planned answer: a status, "hang" (a 200
    after 2 s; ("hang", seconds) after that long) or "drip" (a 200 whose header arrives a byte at
    a time over 3 s)."""

    plan: list[Any] = field(default_factory=list)
    default: Any = 200
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/hooks/o2u"

    def answer(self) -> Any:
        return self.plan.pop(0) if self.plan else self.default


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as state:
        yield state


@contextmanager
def serve_receiver(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    """A receiver on a free loopback port; https with `tls` (a server-side context)."""
    state = Receiver(scheme="http" if tls is None else "https")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = state.answer()
            state.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            if answer == "hang" or isinstance(answer, tuple):  # ("hang", seconds)
                time.sleep(2.0 if answer == "hang" else answer[1])
                answer = 200
            if answer == "drip":  # a 200 sent a byte every 0.1 s: every read gets data in time
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(30):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
                self.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
                return
            self.send_response(answer)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with serve_loopback(Handler, tls) as port:
        state.port = port
        yield state


@contextmanager
def serve_loopback(
    handler: type[http.server.BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
) -> Iterator[int]:
    """`handler` served from a thread on a free loopback port (https with `tls`); yields the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def verify(secret: bytes, signature: str, body: bytes, tolerance: float = 300) -> bool:
    """The receiver's check, as docs/api.md shows it."""
    fields = dict(item.split("=", 1) for item in signature.split(","))
    timestamp = int(fields["t"])
    expected = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(time.time() - timestamp) <= tolerance and hmac.compare_digest(expected, fields["v1"])
