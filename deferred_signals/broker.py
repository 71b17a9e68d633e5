"""Connections of our own to the broker, for publishing: bounded in time, confirmed.

Celery's producer pool waits on a broker as long as its sockets allow (minutes for one that
accepts connections and never answers). These connections bound connecting and every socket
operation by ``PUBLISH_TIMEOUT`` and switch AMQP channels to publisher confirms. One pool of
idle producers per Celery app and process; a forked child starts its own.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery._state import get_current_app
from kombu.exceptions import ChannelError, KombuError
from kombu.exceptions import ConnectionError as KombuConnectionError

from .conf import conf
from .exceptions import BrokerUnavailable, PublishRefused, PublishTimeout
from .redis_wire import wrong_type

logger = logging.getLogger("deferred_signals")


class Confirms:
    """Publisher confirms of one AMQP channel: acks arrive asynchronously, maybe batched.

    Messages are published ``mandatory``: one that no queue takes (its queue was deleted
    after this channel declared it) is acked all the same, and dropped, but returned first.
    """

    def __init__(self, channel: Any) -> None:
        channel.confirm_select()
        self.next_tag = 1  # RabbitMQ numbers a confirming channel's publishes from 1
        self.acked = 0  # every tag up to this one is confirmed
        self.scattered: set[int] = set()
        self.nacked: int | None = None  # the first tag refused
        self.refused: set[int] = set()  # every tag refused
        #: Task ids of the messages returned unroutable, and why (the return has no tag).
        self.returned: dict[str, str] = {}
        channel.events["basic_ack"].add(self.on_ack)
        channel.events["basic_nack"].add(self.on_nack)
        channel.events["basic_return"].add(self.on_return)

    @classmethod
    def of(cls, channel: Any) -> Confirms:
        confirms: Confirms | None = getattr(channel, "_deferred_signals_confirms", None)
        if confirms is None:
            confirms = cls(channel)
            channel._deferred_signals_confirms = confirms
        return confirms

    def on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.acked = max(self.acked, tag)
        else:
            self.scattered.add(tag)
        while self.acked + 1 in self.scattered:
            self.acked += 1
            self.scattered.discard(self.acked)
        self.scattered = {t for t in self.scattered if t > self.acked}

    def on_nack(self, tag: int, multiple: bool) -> None:
        first = self.acked + 1 if multiple else tag
        self.nacked = first if self.nacked is None else min(self.nacked, first)
        self.refused.update(t for t in range(first, tag + 1) if t not in self.scattered)

    def on_return(self, error: Any, exchange: str, routing_key: str, message: Any) -> None:
        task_id = (getattr(message, "headers", None) or {}).get("id")
        if task_id is not None:
            self.returned[str(task_id)] = f"{error} (exchange {exchange!r}, key {routing_key!r})"

    def acked_up_to(self, last: int) -> int:
        if self.nacked is not None:
            return min(self.acked, self.nacked - 1, last)
        return min(self.acked, last)

    def unanswered(self, first: int, last: int) -> int:
        """The first tag from ``first`` to ``last`` neither acked nor refused (``last + 1``
        if none). A tag answered stays answered: a waiter starts its next call from there."""
        tag = first
        while tag <= last and (tag <= self.acked or tag in self.scattered or tag in self.refused):
            tag += 1
        return tag

    def acked_between(self, first: int, last: int) -> list[int]:
        """The tags from ``first`` to ``last`` acked, not refused (after a refusal, say)."""
        return [
            tag
            for tag in range(first, last + 1)
            if (tag <= self.acked or tag in self.scattered) and tag not in self.refused
        ]


def transport_options(app: Any, timeout: float) -> dict[str, Any]:
    """What bounds every socket operation of ``app``'s broker transport by ``timeout``."""
    options: dict[str, Any] = {"max_retries": 0}  # connecting: one try, no sleeps
    scheme = str(app.conf.broker_write_url or app.conf.broker_url or "").split(":", 1)[0]
    if scheme in ("amqp", "amqps", "pyamqp"):
        # Publisher confirms are switched on per channel by _Confirms, and waited for in bulk.
        options.update(read_timeout=timeout, write_timeout=timeout)
    elif scheme in ("redis", "rediss", "sentinel"):
        options.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    return options


class _Pool:
    """Idle producers of one Celery app, on connections with our timeouts (per process)."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout
        self.pid = os.getpid()
        self.idle: list[Any] = []

    def acquire(self, deadline: float) -> Any:
        try:
            return self.idle.pop()
        except IndexError:
            pass
        return _within(deadline, self._connect, lambda producer: self.release(producer, False))

    def _connect(self) -> Any:
        """A new connection and its channel: a handful of round trips (TCP, handshake or
        HELLO/SELECT/PING, channel open, confirm mode), each bounded by the timeout."""
        connection = self.app.connection_for_write(
            connect_timeout=self.timeout,
            heartbeat=0,  # nobody would answer heartbeats between requests
            transport_options=transport_options(self.app, self.timeout),
        )
        try:
            producer = self.app.amqp.Producer(connection, auto_declare=False)
            if getattr(producer.channel, "confirm_select", None) is not None:
                Confirms.of(producer.channel)  # one more round trip: part of connecting
            _one_redis_client(producer.channel)
            return producer
        except BaseException:
            connection.collect()
            raise

    def release(self, producer: Any, healthy: bool) -> None:
        if healthy:
            self.idle.append(producer)
            return
        try:
            # Not release(): a polite AMQP close waits for the broker's answer (read timeout
            # per channel and connection), which a broken or partitioned broker never sends.
            # No socket_timeout: on Redis (no _collect) kombu would set it as the process-wide
            # socket default while closing, and 0 makes other threads' new sockets non-blocking.
            producer.connection.collect()
        except Exception:  # a broken connection may fail to close: it is dropped anyway
            logger.debug("deferred_signals: closing a broken broker connection failed")


_pools: dict[int, _Pool] = {}
_pools_lock = threading.Lock()


def _pool() -> _Pool:
    app = get_current_app()
    timeout = conf.publish_timeout
    pool = _pools.get(id(app))
    # A forked child must not share its parent's sockets; new settings need new connections.
    if pool is None or pool.app is not app or pool.pid != os.getpid() or pool.timeout != timeout:
        with _pools_lock:
            pool = _pools[id(app)] = _Pool(app, timeout)
    return pool


#: Errors that say the broker, or the way to it, failed, whatever the transport.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # sockets: refused, reset, timed out, unreachable (and file-based transports)
    KombuError,  # kombu's OperationalError, ...
    ChannelError,  # py-amqp's, which kombu re-exports (the filesystem transport raises it)
    KombuConnectionError,
    PublishTimeout,
    PublishRefused,
    BrokerUnavailable,
)
_transport_errors: dict[tuple[int, str], tuple[type[BaseException], ...]] = {}

#: AMQP replies refusing one operation on one queue or exchange while the broker and the
#: connection are fine: content too large (311), no consumers (313), access refused (403),
#: not found (404), resource locked (405), precondition failed (406: a queue declared with
#: other arguments, a message over ``max_message_size``).
REFUSAL_CODES = frozenset({311, 313, 403, 404, 405, 406})
#: The AMQP classes of a channel's own operations: exchange, queue, basic. A refusal at login
#: (403 on the connection) is an outage of ours, not a refusal of one call.
_CHANNEL_CLASSES = frozenset({40, 50, 60})
#: Declares and binds (exchange, queue): refused at once, while the call making them waits.
#: A publish (basic) is refused after it was sent: the error surfaces at a later operation.
_SYNCHRONOUS_CLASSES = frozenset({40, 50})


def is_broker_failure(error: BaseException) -> bool:
    """Did the broker (or the way to it) fail, rather than code on the publishing side?

    Only a broker failure is worth a retry on a fresh connection and a cooldown: a bug, or
    kombu internals that changed, would only stop every request of the process from
    publishing for ``PUBLISH_COOLDOWN`` seconds. Both kinds leave the unconfirmed calls to
    be spilled to the outbox. (Celery's signals log and swallow their receivers' errors.)
    """
    if isinstance(error, BROKER_ERRORS):
        return True
    return isinstance(error, _errors_of(get_current_app()))


def is_refusal(error: BaseException) -> bool:
    """Did the broker answer, refusing one message or its queue (a nack, an AMQP channel
    error such as 406 PRECONDITION_FAILED, Redis's WRONGTYPE for a queue's key), rather than
    fail as a whole?

    The other calls still go through: a refusal starts no cooldown and is blamed on its call
    (the relay counts it against that row, which it dead-letters in the end), so one queue
    the broker refuses cannot hold back every other handler's calls.
    """
    if isinstance(error, PublishRefused) or wrong_type(error):
        return True
    if (
        not isinstance(error, ChannelError)
        or getattr(error, "reply_code", None) not in REFUSAL_CODES
    ):
        return False
    return _method_class(error) in _CHANNEL_CLASSES


def refuses_operation_in_hand(error: BaseException) -> bool:
    """A refusal of the declare the publishing call was waiting for (so of that call), not
    of a message published before it."""
    return is_refusal(error) and _method_class(error) in _SYNCHRONOUS_CLASSES


def _method_class(error: BaseException) -> int:
    method = getattr(error, "method_sig", None)
    return method[0] if isinstance(method, tuple) and method else 0


def _errors_of(app: Any) -> tuple[type[BaseException], ...]:
    """The connection and channel errors of ``app``'s transport (redis-py's, py-amqp's, ...)."""
    key = (id(app), str(app.conf.broker_write_url or app.conf.broker_url))
    found = _transport_errors.get(key)
    if found is None:
        try:
            connection = app.connection_for_write()  # not connected: the transport's classes
            errors = (*connection.connection_errors, *connection.channel_errors)
        except Exception:  # an unknown transport: only the errors every transport shares
            return ()  # not kept: asked again next time
        # Python's own exceptions but OSError say nothing of a broker (kombu's Redis
        # transport lists KeyError; Celery's QueueNotFound is one): a bug stays a bug.
        found = _transport_errors[key] = tuple(
            error
            for error in errors
            if error.__module__ != "builtins" or issubclass(error, OSError)
        )
    return found


def _within(deadline: float, make: Callable[[], Any], discard: Callable[[Any], None]) -> Any:
    """``make()``, given up at ``deadline``: each of its socket operations is bounded, but a
    broker that answers each one slowly could hold a commit for several timeouts in a row.

    It runs in a thread of its own (connecting is rare: the first publish of a process, and
    after failures); given up, its result is discarded once it arrives.
    """
    lock = threading.Lock()
    outcome: list[Any] = []  # [True, result] or [False, error]; [None] once given up

    def run() -> None:
        try:
            result: list[Any] = [True, make()]
        except BaseException as error:  # handed to the waiting thread
            result = [False, error]
        with lock:
            late = outcome == [None]
            if not late:
                outcome[:] = result
        if late and result[0]:
            discard(result[1])

    thread = threading.Thread(target=run, name="deferred_signals connect", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        if not outcome:
            outcome.append(None)
            raise PublishTimeout(
                f"connecting to the broker took longer than PUBLISH_TIMEOUT "
                f"({conf.publish_timeout} s)"
            )
    ok, value = outcome
    if not ok:
        raise value
    return value


def _one_redis_client(channel: Any) -> None:
    """kombu's Redis channel builds a new ``redis.Redis`` client (~170 response callbacks,
    ~70 us) for every publish and every pipelined batch. A producer of ours is used by one
    thread at a time, so one client on the channel's own pool serves all of them."""
    create = getattr(channel, "_create_client", None)
    if create is None or getattr(channel, "conn_or_acquire", None) is None:
        return
    client = create()

    @contextmanager
    def conn_or_acquire(given: Any = None) -> Iterator[Any]:
        yield given or client

    channel.conn_or_acquire = conn_or_acquire


def bound_sockets(producer: Any, timeout: float) -> None:
    """Let no socket operation of ``producer``'s connection outlast ``timeout`` seconds: the
    time left of PUBLISH_TIMEOUT, set before each chunk rather than once at connect time."""
    timeout = max(timeout, 0.001)
    channel = producer.channel
    pool = getattr(channel, "_pool", None)  # kombu's Redis channel: a redis-py pool
    if pool is not None:
        connections = [
            *getattr(pool, "_available_connections", ()),
            *getattr(pool, "_in_use_connections", ()),
        ]
        for connection in connections:
            connection.socket_timeout = timeout  # redis-py re-applies it after custom reads
            sock = getattr(connection, "_sock", None)
            if sock is not None:
                sock.settimeout(timeout)
        return
    transport = getattr(getattr(producer.connection, "connection", None), "transport", None)
    sock = getattr(transport, "sock", None)  # py-amqp: timeouts are SO_RCVTIMEO/SO_SNDTIMEO
    if sock is not None:
        seconds = int(timeout)
        value = struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class _Borrowed:
    """A pooled producer of the current app for a block: back to the pool after it, or
    closed if it raised. A class rather than a generator's context manager: this is on every
    commit's path."""

    __slots__ = ("deadline", "pool", "producer")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __enter__(self) -> tuple[Any, Any]:
        self.pool = pool = _pool()
        self.producer = pool.acquire(self.deadline)
        return pool.app, self.producer

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.pool.release(self.producer, healthy=kind is None)


def producer(deadline: float) -> _Borrowed:
    """``with producer(deadline) as (app, producer)``: see :class:`_Borrowed`."""
    return _Borrowed(deadline)


def reset() -> None:
    """Forget pooled connections (settings changed, tests)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        if pool.pid == os.getpid():
            for producer in pool.idle:
                pool.release(producer, healthy=False)
