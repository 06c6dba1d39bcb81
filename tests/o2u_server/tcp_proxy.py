"""A throttling TCP proxy for fault tests: forwards connections to an upstream address, sends the
upstream's answers at a fixed rate, and can go silent (connections stay open, nothing more passes -
a hung peer) or be cut (every connection reset, the port closed - a vanished peer)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class ThrottledProxy:
    """Forwards TCP connections to `upstream`, relaying its answers at `bytes_per_second`."""

    def __init__(self, upstream: str, bytes_per_second: float) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rate = bytes_per_second
        self.forwarded = 0  # bytes relayed from the upstream to the connecting side
        self.silent = threading.Event()
        self.closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _track(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.extend(sockets)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._track(client)
            if self.silent.is_set():
                continue  # accept and never answer: a hung store
            server = socket.create_connection(self.upstream)
            self._track(server)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(64 * 1024):
                while self.silent.is_set() and not self.closed.is_set():
                    time.sleep(0.05)
                target.sendall(data)
                if answers:
                    self.forwarded += len(data)
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass  # the other side or the test closed the connection
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def wait_forwarded(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.forwarded < count:
            assert time.monotonic() < deadline, f"only {self.forwarded} bytes went through"
            time.sleep(0.02)

    def cut(self) -> None:
        """Reset every connection and stop listening: the store is gone."""
        self.closed.set()
        with self._lock:
            for sock in [self.listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
