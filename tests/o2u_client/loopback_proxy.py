"""A TCP proxy on loopback between a client and a test server, to break the connection in the two
ways a network does: `freeze()` makes the open connections silent both ways while their sockets
stay open (a peer that vanished without a reset), `refuse()` closes them and refuses new ones (a
server that is down or being rescheduled) until `restore()`."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

__all__ = ["LoopbackProxy"]


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes the pump reading it, and tells the peer
    sock.close()


class LoopbackProxy:
    """Forwards 127.0.0.1:<its port> (`address`) to 127.0.0.1:`port`; `connections` counts the
    connections it forwarded."""

    def __init__(self, port: int) -> None:
        self._upstream = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self._frozen: set[int] = set()
        self._refusing = False
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept)]
        self._threads[0].start()

    def freeze(self) -> None:
        self._frozen.update(range(self.connections))

    def refuse(self) -> None:
        with self._lock:
            self._refusing = True
            opened, self._open = self._open, []
        for sock in opened:
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            self._refusing = False

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                if self._refusing:
                    _close(downstream)
                    continue
                upstream = socket.create_connection(("127.0.0.1", self._upstream))
                self._open += [downstream, upstream]
                number, self.connections = self.connections, self.connections + 1
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                thread = threading.Thread(target=self._pump, args=(source, sink, number))
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, number: int) -> None:
        source.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if number not in self._frozen:  # a frozen connection swallows what it gets
                try:
                    sink.sendall(data)
                except OSError:
                    return

    def __enter__(self) -> LoopbackProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        for sock in [self._listener, *self._open]:
            sock.close()
