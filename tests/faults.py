"""A loopback TCP proxy that cuts, black-holes and partitions a real service in fault tests.

Point a client at the proxy instead of the service, then switch modes while it runs::

    with FaultProxy(6379) as proxy:
        client = redis.Redis.from_url(proxy.url_for("redis://127.0.0.1:6379/15"))
        proxy.refuse()  # the service is down
        proxy.forward()  # and back, on the same port

The modes, each applied to new and already open connections:

``forward``
    Bytes pass both ways, half-closes included. The mode after ``start()``.
``refuse``
    Nothing listens on the port, so a connect fails at once with ``ConnectionRefusedError``;
    every open connection is reset (RST). ``forward()`` listens again on the same port.
``blackhole``
    A service that accepts and never speaks: connections are accepted, and whatever arrives
    from either side is read and thrown away. A connection that lost bytes this way is
    reset when ``forward()`` comes back, because its byte stream cannot be resumed. A client
    that hangs up is let go (its upstream connection is closed too).
``hold``
    A network partition: connections stay open and bytes (and FINs) from both sides are kept,
    not delivered. ``forward()`` delivers what was held, in order, as a network that heals
    would; ``reset_all()`` drops it. A connection opened during ``hold`` reaches the service
    only on ``forward()``. If one side resets meanwhile (RabbitMQ does on missed heartbeats),
    the other side does not learn it until ``forward()``, which then resets it.

``reset_all()`` resets every open connection on both sides, whatever the mode, and keeps
the mode: ``hold(); time.sleep(8); reset_all(); forward()`` is a partition that ends with
both peers having given up. Mode changes are synchronous: when the method returns, the
proxy's I/O thread has applied them.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

LOOPBACK = "127.0.0.1"
FORWARD, REFUSE, BLACKHOLE, HOLD = "forward", "refuse", "blackhole", "hold"

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_CHUNK = 65536
# Past this many bytes waiting to go one way, stop reading the sender: TCP pushes back.
_HIGH_WATER = 1 << 20
# SO_LINGER on, timeout 0: close() sends RST and drops unsent data, like a crashed peer.
_LINGER_RST = struct.pack("ii", 1, 0)
_ANSWER_TIMEOUT = 10.0


class _Flow:
    """Bytes on their way in one direction, and whether the sender half-closed."""

    __slots__ = ("buffer", "eof", "shut")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False  # the sender sent FIN
        self.shut = False  # and that FIN was passed on


class _Link:
    """One client connection and, once the service may be reached, its upstream connection."""

    __slots__ = (
        "broken",
        "client",
        "closed",
        "connecting",
        "dead",
        "to_client",
        "to_upstream",
        "upstream",
    )

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connecting = False
        self.to_upstream = _Flow()
        self.to_client = _Flow()
        # Bytes were thrown away or a side failed while hidden: the stream cannot resume.
        self.broken = False
        self.dead: socket.socket | None = None  # the side that failed, no longer watched
        self.closed = False


def _abort(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already failed: close() is all that is left to do
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of a service on 127.0.0.1, with injectable faults."""

    def __init__(self, target_port: int, target_host: str = LOOPBACK, listen_port: int = 0) -> None:
        address = ipaddress.ip_address(target_host)
        if address.version != 4 or not address.is_loopback:
            raise ValueError(
                f"FaultProxy only proxies to IPv4 loopback, not {target_host!r}: "
                f"run the service on {LOOPBACK}"
            )
        self.target = (target_host, target_port)
        self._port = listen_port
        self._mode = FORWARD
        self._links: set[_Link] = set()
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False

    # -- public API --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port on 127.0.0.1 that clients connect to; the same in every mode."""
        if not self._port:
            raise RuntimeError("FaultProxy has no port yet: call start() first")
        return self._port

    @property
    def mode(self) -> str:
        """``"forward"``, ``"refuse"``, ``"blackhole"`` or ``"hold"``."""
        return self._mode

    @property
    def connections(self) -> int:
        """How many client connections are open through the proxy right now."""
        return len(self._links)

    def url_for(self, url: str) -> str:
        """``url`` (a broker or database URL for the target) pointed at the proxy instead."""
        parts = urlsplit(url)
        if parts.port is not None and parts.port != self.target[1]:
            raise ValueError(f"{url!r} is not for port {self.target[1]}, which this proxy fronts")
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{LOOPBACK}:{self.port}"))

    def start(self) -> FaultProxy:
        """Listen and forward. Returns the proxy, for ``proxy = FaultProxy(6379).start()``."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy is already started")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, _READ, "wake")
        self._mode = FORWARD
        try:
            self._listen()
        except OSError:
            self.close()  # the port is taken: leave nothing open behind
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"FaultProxy:{self._port}->{self.target[1]}", daemon=True
        )
        self._thread.start()
        return self

    def forward(self) -> None:
        """Pass bytes both ways again; deliver what ``hold()`` kept."""
        self._call(lambda: self._switch(FORWARD))

    def refuse(self) -> None:
        """Stop listening (connects are refused) and reset every open connection."""
        self._call(lambda: self._switch(REFUSE))

    def blackhole(self) -> None:
        """Accept connections but never pass on or answer a byte."""
        self._call(lambda: self._switch(BLACKHOLE))

    def hold(self) -> None:
        """Keep connections open and their bytes undelivered, as in a network partition."""
        self._call(lambda: self._switch(HOLD))

    def reset_all(self) -> None:
        """Reset (RST) every open connection on both sides, dropping held bytes."""
        self._call(self._reset_links)

    def close(self) -> None:
        """Reset every connection, stop listening and join the I/O thread. Idempotent."""
        thread = self._thread
        try:
            if thread is not None and thread.is_alive():
                self._call(self._stop)
                thread.join(_ANSWER_TIMEOUT)
        finally:
            # The I/O thread is gone (or never ran): whatever it left open is closed here.
            self._stop()
            for closable in (self._selector, self._wake_r, self._wake_w):
                if closable is not None:
                    closable.close()
            self._selector = self._wake_r = self._wake_w = None

    def __enter__(self) -> FaultProxy:
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        host, port = self.target
        return f"<FaultProxy {LOOPBACK}:{self._port} -> {host}:{port}, {self._mode}>"

    # -- commands, run on the I/O thread ----------------------------------------------------

    def _call(self, command: Callable[[], None]) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive() or self._wake_w is None:
            raise RuntimeError("FaultProxy is not running: call start() first")
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                command()
            except BaseException as error:  # handed to the caller, below
                failure.append(error)
            finally:
                done.set()

        self._commands.put(run)
        self._wake_w.send(b"\0")
        if not done.wait(_ANSWER_TIMEOUT):
            raise RuntimeError(f"{self!r}: the I/O thread did not answer")
        if failure:
            raise failure[0]

    def _switch(self, mode: str) -> None:
        if mode == REFUSE:
            self._mode = mode
            self._reset_links()
            self._unlisten()
            return
        if self._listener is None:
            self._listen()  # raises, mode unchanged, if another process took the port
        self._mode = mode
        for link in list(self._links):
            try:
                if mode == FORWARD:
                    if link.broken:
                        self._drop(link, reset=True)
                        continue
                    if link.upstream is None:
                        self._connect(link)
                    self._flush(link)
                if not link.closed:
                    self._watch(link)
            except OSError:
                self._drop(link, reset=True)

    def _reset_links(self) -> None:
        for link in list(self._links):
            self._drop(link, reset=True)

    def _stop(self) -> None:
        self._reset_links()
        self._unlisten()
        self._stopped = True

    # -- the I/O loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None
        while not self._stopped:
            for key, events in self._selector.select():
                if key.data == "wake":
                    self._run_commands()
                elif key.data == "listen":
                    self._accept()
                else:
                    link, from_client = key.data
                    if not link.closed:  # an earlier event in this batch may have closed it
                        self._on_ready(link, from_client, events)

    def _run_commands(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _listen(self) -> None:
        assert self._selector is not None
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Re-listening after refuse() must get the same port back at once.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((LOOPBACK, self._port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._selector.register(listener, _READ, "listen")

    def _unlisten(self) -> None:
        if self._listener is None:
            return
        if self._selector is not None:
            self._selector.unregister(self._listener)
        # Closing also resets connections still waiting in the accept backlog.
        self._listener.close()
        self._listener = None

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            client, _ = self._listener.accept()
        except OSError:
            return  # the client gave up already, or refuse() closed the listener in this batch
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client)
        self._links.add(link)
        try:
            if self._mode == FORWARD:
                self._connect(link)
            self._watch(link)
        except OSError:
            self._drop(link, reset=True)

    def _connect(self, link: _Link) -> None:
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        link.upstream = upstream
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = upstream.connect_ex(self.target)
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))  # the service is down: reset the client
        link.connecting = code != 0

    def _on_ready(self, link: _Link, from_client: bool, events: int) -> None:
        sock = link.client if from_client else link.upstream
        assert sock is not None
        try:
            if link.connecting and not from_client:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
                link.connecting = False
            elif events & _READ:
                flow = link.to_upstream if from_client else link.to_client
                data = sock.recv(_CHUNK)
                if not data:
                    flow.eof = True
                if self._mode == BLACKHOLE:
                    if not data and from_client:
                        self._drop(link, reset=False)  # the client hung up: so do we
                        return
                    link.broken = True
                else:
                    flow.buffer += data
            self._flush(link)
            if not link.closed:
                self._watch(link)
        except OSError:
            if self._mode == FORWARD or (from_client and self._mode == BLACKHOLE):
                self._drop(link, reset=True)
            else:
                self._hide_failure(link, sock)

    def _hide_failure(self, link: _Link, sock: socket.socket) -> None:
        """A side reset (or could not connect) while held: the other side must not learn yet."""
        if link.dead is not None:
            self._drop(link, reset=True)  # both sides are gone: nothing is left to hide
            return
        link.broken = True
        link.dead = sock
        assert self._selector is not None
        with contextlib.suppress(KeyError):
            self._selector.unregister(sock)

    def _flush(self, link: _Link) -> None:
        """Send what can be sent now; close the link once both sides have finished."""
        if self._mode != FORWARD or link.upstream is None or link.connecting:
            return
        for flow, destination in (
            (link.to_upstream, link.upstream),
            (link.to_client, link.client),
        ):
            if flow.buffer:
                try:
                    sent = destination.send(flow.buffer)
                except BlockingIOError:
                    sent = 0
                del flow.buffer[:sent]
            if flow.eof and not flow.buffer and not flow.shut:
                destination.shutdown(socket.SHUT_WR)
                flow.shut = True
        if link.to_upstream.shut and link.to_client.shut:
            self._drop(link, reset=False)

    def _watch(self, link: _Link) -> None:
        """Ask the selector for exactly the events this link can act on in this mode."""
        forwarding = self._mode == FORWARD
        blackhole = self._mode == BLACKHOLE

        def reads(flow: _Flow) -> int:
            wanted = not flow.eof and (blackhole or len(flow.buffer) < _HIGH_WATER)
            return _READ if wanted else 0

        def writes(flow: _Flow) -> int:
            return _WRITE if forwarding and flow.buffer else 0

        if link.client is not link.dead:
            events = reads(link.to_upstream) | writes(link.to_client)
            self._register(link.client, events, link, True)
        if link.upstream is not None and link.upstream is not link.dead:
            events = reads(link.to_client) | writes(link.to_upstream)
            self._register(link.upstream, _WRITE if link.connecting else events, link, False)

    def _register(self, sock: socket.socket, events: int, link: _Link, from_client: bool) -> None:
        assert self._selector is not None
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            if events:
                self._selector.register(sock, events, (link, from_client))
            return
        if not events:
            self._selector.unregister(sock)
        elif key.events != events:
            self._selector.modify(sock, events, key.data)

    def _drop(self, link: _Link, reset: bool) -> None:
        link.closed = True
        self._links.discard(link)
        for sock in (link.client, link.upstream):
            if sock is None:
                continue
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):  # not watched at the moment
                    self._selector.unregister(sock)
            if reset:
                _abort(sock)
            else:
                sock.close()
