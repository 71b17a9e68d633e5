"""Publishing committed calls to the broker, bounded in time and confirmed.

A commit must never wait on the broker longer than ``PUBLISH_TIMEOUT``, whatever the broker
does: refuse connections, accept them and never answer, or swallow bytes during a partition.
So calls go out over connections of our own, whose connect and socket operations are bounded
by that timeout, with publisher confirms on AMQP (Redis answers every command, so its reply
is the confirmation). A message counts as published only once confirmed; the caller spills
the rest. After a failure the process stops trying for ``PUBLISH_COOLDOWN`` seconds, so an
outage costs one slow request per process and cooldown, not a timeout on every request.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from celery._state import get_current_app

from . import signals
from .calls import committed_at
from .conf import conf
from .exceptions import DeferredSignalError
from .messages import MessageBuilder, publish_fallback, publish_message

if TYPE_CHECKING:
    from .dispatch import PendingCall

logger = logging.getLogger("deferred_signals")

#: Messages pipelined per round trip on transports that batch (Redis): 100 keeps a big
#: transaction's peak memory low for 10 round trips per 1,000 calls instead of 1.
BATCH_SIZE = 100
#: A failure this soon after the attempt started is a stale pooled connection (the broker
#: restarted, an idle connection was closed): one retry on a fresh connection is cheap.
STALE_CONNECTION_WINDOW = 0.25
#: Calls named in a batch's log line; a relay's batch of 500 says "and 490 more".
LOGGED_CALLS = 10


class BrokerUnavailable(DeferredSignalError):
    """The broker failed recently: calls are spilled without trying it until the cooldown ends."""


class _Cooldown:
    """Per process: when the broker last failed, and until when not to try it again."""

    until = 0.0
    error: BaseException | None = None

    def active(self) -> bool:
        return time.monotonic() < self.until

    def start(self, error: BaseException) -> None:
        self.until = time.monotonic() + conf.publish_cooldown
        self.error = error

    def clear(self) -> None:
        self.until, self.error = 0.0, None


cooldown = _Cooldown()


def publish(calls: Sequence[PendingCall]) -> tuple[int, BaseException | None]:
    """Publish ``calls`` in order; return how many the broker confirmed, and the error if not all.

    Never raises. The confirmed ones are always a prefix of ``calls``.
    """
    if cooldown.active():
        return 0, BrokerUnavailable(
            f"the broker failed less than {conf.publish_cooldown} s ago ({cooldown.error!r}); "
            "not trying it again until the cooldown ends"
        )
    started = time.monotonic()
    progress = _Progress(calls, deadline=started + conf.publish_timeout)
    for attempt in (1, 2):
        try:
            with _producer() as (app, producer):
                progress.send(app, producer)
            cooldown.clear()
            _confirmed(calls, progress.done, started)
            return progress.done, None
        except Exception as error:
            answered = getattr(error, "broker_answering", False)
            if (
                attempt == 1
                and not answered
                and time.monotonic() - started < STALE_CONNECTION_WINDOW
            ):
                continue  # a stale pooled connection: once more on a fresh one
            if not answered:  # an outage: spill without trying for a while
                cooldown.start(error)
            _confirmed(calls, progress.done, started)
            return progress.done, error
    raise AssertionError("unreachable")  # pragma: no cover


def _confirmed(calls: Sequence[PendingCall], done: int, started: float) -> None:
    """One log line for the batch, and ``call_published`` for each call the broker confirmed."""
    if not done:
        return
    if logger.isEnabledFor(logging.INFO):
        shown = calls[: min(done, LOGGED_CALLS)]
        logger.info(
            "deferred_signals published %d call(s) in %.1f ms: %s%s",
            done,
            (time.monotonic() - started) * 1000,
            ", ".join(f"{call.handler.name} [{call.id}]" for call in shown),
            f" and {done - len(shown)} more" if done > len(shown) else "",
        )
    if not signals.call_published.receivers:
        return
    now = time.time()
    published_at = datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)
    for call in calls[:done]:
        at = call.body.get("at")
        signals.call_published.send(
            call.handler.func,
            handler=call.handler.name,
            call_id=call.id,
            committed_at=committed_at(call.body),
            published_at=published_at,
            seconds=None if at is None else max(0.0, now - at),
        )


class PublishTimeout(DeferredSignalError):
    """Publishing ran past ``PUBLISH_TIMEOUT``: the calls not yet confirmed are spilled.

    ``broker_answering``: the broker confirmed everything sent so far, the batch was just too
    big for the time allowed; that is no outage, so no cooldown follows.
    """

    def __init__(self, message: str, broker_answering: bool = False) -> None:
        super().__init__(message)
        self.broker_answering = broker_answering


class _Progress:
    """One publish attempt's calls, and how many of them the broker has confirmed so far."""

    def __init__(self, calls: Sequence[PendingCall], deadline: float) -> None:
        self.calls = calls
        self.deadline = deadline
        self.done = 0

    def remaining(self, answering: bool = False) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise PublishTimeout(
                f"PUBLISH_TIMEOUT ({conf.publish_timeout} s) ran out", broker_answering=answering
            )
        return remaining

    def send(self, app: Any, producer: Any) -> None:
        channel = producer.channel
        publish = _Publish(app, producer)
        if getattr(channel, "confirm_select", None) is not None:
            self._send_confirmed(producer, publish, _Confirms.of(channel))
            return
        # Redis pipelines a chunk and confirms it with its replies; a transport that does
        # neither (filesystem, memory) has written each message when publish() returns.
        pipelines = bool(getattr(channel, "create_publish_batch", None)) and getattr(
            channel, "supports_batch_publish", True
        )
        size = BATCH_SIZE if pipelines else 1
        while self.done < len(self.calls):
            remaining = self.remaining(answering=self.done > 0)
            chunk = self.calls[self.done : self.done + size]
            with producer.batch(max_size=len(chunk)) if len(chunk) > 1 else nullcontext():
                for call in chunk:
                    publish(call, remaining)
            self.done += len(chunk)

    def _send_confirmed(self, producer: Any, publish: _Publish, confirms: _Confirms) -> None:
        """AMQP: publish everything, then wait for the broker's acks (one wait, not one each)."""
        first, base = confirms.next_tag, self.done
        for call in self.calls[self.done :]:
            publish(call, self.remaining())
            confirms.next_tag += 1
        last = confirms.next_tag - 1
        while True:
            acked = confirms.acked_up_to(last)
            self.done = base + max(0, acked - first + 1)
            if acked >= last:
                return
            # Confirms may arrive out of order: after a nack, wait for the tags before it.
            if confirms.nacked is not None and acked >= confirms.nacked - 1:
                raise PublishRefused(
                    f"the broker refused message {confirms.nacked - first + 1} of the batch"
                )
            producer.connection.drain_events(timeout=self.remaining(answering=acked >= first))


class PublishRefused(DeferredSignalError):
    """The broker answered a publish with a negative acknowledgement (``basic.nack``): it is
    up, so the refused calls are spilled without a cooldown."""

    broker_answering = True


class _Confirms:
    """Publisher confirms of one AMQP channel: acks arrive asynchronously, maybe batched."""

    def __init__(self, channel: Any) -> None:
        channel.confirm_select()
        self.next_tag = 1  # RabbitMQ numbers a confirming channel's publishes from 1
        self.acked = 0  # every tag up to this one is confirmed
        self.scattered: set[int] = set()
        self.nacked: int | None = None
        channel.events["basic_ack"].add(self.on_ack)
        channel.events["basic_nack"].add(self.on_nack)

    @classmethod
    def of(cls, channel: Any) -> _Confirms:
        confirms: _Confirms | None = getattr(channel, "_deferred_signals_confirms", None)
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

    def acked_up_to(self, last: int) -> int:
        if self.nacked is not None:
            return min(self.acked, self.nacked - 1, last)
        return min(self.acked, last)


class _Publish:
    """Publishes one call: a message built once per handler route, else ``apply_async``."""

    def __init__(self, app: Any, producer: Any) -> None:
        self.producer = producer
        self.builder = MessageBuilder(app)

    def __call__(self, call: PendingCall, remaining: float) -> None:
        task, options = call.handler.task, call.handler.merged.publish
        message = self.builder.build(task, call.id, call.body, options)
        if message is None:
            publish_fallback(self.producer, task, call.id, call.body, options, timeout=remaining)
        else:
            publish_message(self.producer, message, timeout=remaining)


# --- connections of our own ----------------------------------------------------------------


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

    def acquire(self) -> Any:
        try:
            return self.idle.pop()
        except IndexError:
            pass
        connection = self.app.connection_for_write(
            connect_timeout=self.timeout,
            heartbeat=0,  # nobody would answer heartbeats between requests
            transport_options=transport_options(self.app, self.timeout),
        )
        try:
            return self.app.amqp.Producer(connection, auto_declare=False)
        except BaseException:
            connection.release()
            raise

    def release(self, producer: Any, healthy: bool) -> None:
        if healthy:
            self.idle.append(producer)
            return
        try:
            # Not release(): a polite AMQP close waits for the broker's answer (read timeout
            # per channel and connection), which a broken or partitioned broker never sends.
            producer.connection.collect(socket_timeout=0)
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


@contextmanager
def _producer() -> Iterator[tuple[Any, Any]]:
    pool = _pool()
    producer = pool.acquire()
    healthy = False
    try:
        yield pool.app, producer
        healthy = True
    finally:
        pool.release(producer, healthy)


def reset() -> None:
    """Forget pooled connections and the cooldown (settings changed, tests)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        if pool.pid == os.getpid():
            for producer in pool.idle:
                pool.release(producer, healthy=False)
    cooldown.clear()
