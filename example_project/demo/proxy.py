"""A loopback TCP proxy the demo can cut: the web side's way to a Redis or RabbitMQ broker.

``cut()`` resets every connection through it and refuses new ones, as a broker that went
away does; ``restore()`` listens again on the same port. Small on purpose: the package's
test suite has a fuller one (tests/faults.py) that also black-holes and holds traffic.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

LOOPBACK = "127.0.0.1"


def _abort(sock: socket.socket) -> None:
    """Close at once: the peer sees the connection die, and a thread blocked on the socket
    (in ``accept`` or ``recv``) wakes up, which ``close()`` alone does not do on Linux."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TCPProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TCPProxy:
        self._listen()
        return self

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            _abort(listener)
        for sock in sockets:
            _abort(sock)

    def restore(self) -> None:
        if self._listener is None:
            self._listen()

    close = cut

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _abort(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _abort(client)
                    _abort(upstream)
                    return
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets -= {source, sink}
            _abort(source)
            _abort(sink)
