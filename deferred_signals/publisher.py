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
import time
import weakref
from collections.abc import Mapping, Sequence
from contextlib import nullcontext, suppress
from itertools import islice
from typing import TYPE_CHECKING, Any

import celery
from celery import signals as celery_signals
from celery._state import get_current_app
from kombu import Producer

from . import broker, propagation, sentry, signals
from .calls import HANDLER_FAILED, committed_at
from .conf import conf
from .exceptions import BrokerUnavailable, PublishRefused, PublishTimeout
from .messages import Message, MessageBuilder, summary
from .redispush import RedisPush, dumps_tree

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
#: Write Redis messages with :class:`RedisPush` (False: through ``Producer.publish``, for
#: the benchmark's side-by-side comparison).
FAST_REDIS = True


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


def publish(
    calls: Sequence[PendingCall], deadline: float | None = None
) -> tuple[int, BaseException | None]:
    """Publish ``calls`` in order; return how many the broker confirmed, and the error if not all.

    Never raises an ``Exception``; a ``BaseException`` that is not one goes on up, saying
    how many calls were confirmed before it (:func:`published_before`). The confirmed ones
    are a prefix of ``calls``, and, after a call the broker refused, those :func:`taken`
    finds. ``deadline`` (``time.monotonic()``): the caller's, shared by its attempts; by
    default ``PUBLISH_TIMEOUT`` from now. (With Celery's ``task_always_eager`` and
    ``task_eager_propagates``, all of them may be done and the error the first handler's
    exception: :func:`_apply_eagerly`.)
    """
    if always_eager():
        return _apply_eagerly(calls)
    if cooldown.active():
        return 0, BrokerUnavailable(
            f"the broker failed less than {conf.publish_cooldown} s ago ({cooldown.error!r}); "
            "not trying it again until the cooldown ends"
        )
    started = time.monotonic()
    if deadline is None:
        deadline = started + conf.publish_timeout
    progress = _Progress(calls, deadline=deadline)
    failure: BaseException | None = None
    for attempt in (1, 2):
        try:
            with broker.producer(progress.deadline) as (app, producer):
                progress.send(app, producer)
            cooldown.clear()
            failure = None
            break
        except BaseException as error:
            if not isinstance(error, Exception):
                # KeyboardInterrupt, SystemExit, gevent's Timeout: not ours to swallow, but
                # the caller spills what the broker had not confirmed before it.
                _note_published(error, progress.done)
                raise
            failure = error
            if not broker.is_broker_failure(error):
                # A bug, or kombu internals that changed: the broker is not to blame, so
                # neither another try nor a cooldown; the caller spills the rest.
                break
            # A refusal of one call (a nack, a queue declared with other arguments) is an
            # answer too: neither another try nor a cooldown for the other calls.
            answered = getattr(error, "broker_answering", False) or broker.is_refusal(error)
            if (
                attempt == 1
                and not answered
                and time.monotonic() - started < STALE_CONNECTION_WINDOW
            ):
                continue  # a stale pooled connection: once more on a fresh one
            if not answered and not _short_changed(started, deadline):
                cooldown.start(error)  # an outage: spill without trying for a while
            break
    if failure is not None and progress.written:
        # Written by the push in a chunk kombu's pipeline then failed: published, and not
        # to be spilled (they would be published twice).
        with suppress(AttributeError, TypeError):  # an exception that takes no attributes
            after = progress.written.union(getattr(failure, PUBLISHED_AFTER, ()))
            setattr(failure, PUBLISHED_AFTER, frozenset(after))
    done, _ = taken(calls, progress.done, failure)
    _confirmed(done, len(done), started)
    return progress.done, failure


#: Set on a ``BaseException`` that is not an ``Exception`` (KeyboardInterrupt, SystemExit,
#: gevent's Timeout) as it leaves :func:`publish`: how many calls the broker had confirmed.
PUBLISHED_BEFORE = "deferred_signals_published_before"


def _note_published(error: BaseException, done: int) -> None:
    with suppress(AttributeError, TypeError):  # an exception that takes no attributes
        setattr(error, PUBLISHED_BEFORE, done)


def published_before(error: BaseException) -> int:
    """How many calls :func:`publish` had confirmed when ``error`` (not an ``Exception``)
    interrupted it; 0 when it does not say (all of them are then spilled: at least once)."""
    done = getattr(error, PUBLISHED_BEFORE, 0)
    return done if isinstance(done, int) else 0


def _short_changed(started: float, deadline: float) -> bool:
    """An attempt that ran out of a budget an earlier attempt of its commit mostly used up
    (after a refusal: the broker answered that one). Silence for less than half of
    ``PUBLISH_TIMEOUT`` does not prove the broker down, and a false cooldown spills every
    commit for ``PUBLISH_COOLDOWN``; a broker really down fails the next commit's attempt."""
    return time.monotonic() >= deadline and deadline - started < conf.publish_timeout / 2


def taken(
    calls: Sequence[PendingCall], confirmed: int, error: BaseException | None
) -> tuple[list[PendingCall], list[PendingCall]]:
    """What :func:`publish` returned, as the calls the broker took and those it did not: the
    confirmed prefix and, after a refusal, the calls after it that the broker took all the
    same (those of a batch to other queues than a full one), or that Redis took before the
    rest of their chunk failed (``published_after``)."""
    after = getattr(error, PUBLISHED_AFTER, None)
    rest = calls[confirmed:]
    if not after:
        return list(calls[:confirmed]), list(rest)
    return [*calls[:confirmed], *(c for c in rest if c.id in after)], [
        c for c in rest if c.id not in after
    ]


#: (app, its own changes of task_always_eager and task_eager_propagates, conf.generation,
#: and the two settings): reading app.conf through Django's settings costs some 30 us, too
#: much for every commit.
_eager: tuple[Any, Any, Any, int, bool, bool] | None = None


def _eager_settings() -> tuple[Any, ...]:
    global _eager
    app = get_current_app()
    app_conf = app.conf
    changes = app_conf.changes or {}
    always, propagates = changes.get("task_always_eager"), changes.get("task_eager_propagates")
    seen = _eager
    if (
        seen is None
        or seen[0] is not app
        or seen[1] is not always
        or seen[2] is not propagates
        or seen[3] != conf.generation
    ):
        seen = _eager = (
            app,
            always,
            propagates,
            conf.generation,
            bool(app_conf.task_always_eager),
            bool(app_conf.task_eager_propagates),
        )
    return seen


def always_eager() -> bool:
    """Celery's ``task_always_eager`` for the current app (a project's test settings)."""
    return bool(_eager_settings()[4])


def eager_propagates() -> bool:
    """Celery's ``task_always_eager`` with ``task_eager_propagates``: a deferred handler's
    exception is to reach the code that committed (a test), as a Celery task's does."""
    seen = _eager_settings()
    return bool(seen[4] and seen[5])


def _apply_eagerly(calls: Sequence[PendingCall]) -> tuple[int, BaseException | None]:
    """``task_always_eager``: ``apply_async`` runs each task here, as Celery does for its own
    tasks, without a connection to the broker (none may be running where tests run).

    With ``task_eager_propagates``, a handler failing for good raises here: the call ran (a
    dead letter now, not to be spilled and run again), and so do the calls after it. The first
    such exception is returned with every call done, for the caller to raise
    (:data:`~deferred_signals.calls.HANDLER_FAILED` marks it) once it has done its part.
    """
    started, done, failure = time.monotonic(), 0, None
    handler_failed: BaseException | None = None
    for call in calls:
        try:
            publish_fallback(
                None, call.handler.task, call.id, call.body, call.handler.merged.publish
            )
        except BaseException as error:
            if not isinstance(error, Exception):
                _note_published(error, done)
                raise
            if getattr(error, HANDLER_FAILED, False):
                # The handler ran here and failed for good, which its task logged and kept
                # as a dead letter, as on a worker. Not a failure to publish: spilled, the
                # call would run again from the outbox.
                if handler_failed is None:
                    handler_failed = error
                done += 1
                continue
            _blame(error, call)
            failure = error
            break
        done += 1
    _confirmed(calls, done, started)
    return done, failure or handler_failed


def _confirmed(calls: Sequence[PendingCall], done: int, started: float) -> None:
    """One log line for the batch, and ``call_published`` for each call the broker confirmed
    (whose receivers cannot raise: see :mod:`.signals`)."""
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
        body = call.body  # built on each read: once
        at = body.get("at")
        signals.call_published.send(
            call.handler.func,
            handler=call.handler.name,
            call_id=call.id,
            committed_at=committed_at(body),
            published_at=published_at,
            seconds=None if at is None else max(0.0, now - at),
        )


class _Progress:
    """One publish attempt's calls, and how many of them the broker has confirmed so far."""

    def __init__(self, calls: Sequence[PendingCall], deadline: float) -> None:
        self.calls = calls
        self.deadline = deadline
        self.done = 0
        # _refuse_returned: how many of Confirms.returned it has seen, and where each call
        # of the attempt in hand stands.
        self.returns_seen = 0
        self.positions: dict[str, int] | None = None
        #: Calls after ``done`` that Redis took: the push wrote them, then kombu's pipeline
        #: of their chunk failed. Not sent again by a retry; named in the error's
        #: ``published_after``.
        self.written: set[str] = set()

    def remaining(self, answering: bool = False) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise PublishTimeout(
                f"PUBLISH_TIMEOUT ({conf.publish_timeout} s) ran out", broker_answering=answering
            )
        return remaining

    def send(self, app: Any, producer: Any) -> None:
        channel = producer.channel
        publish = _Publish.of(app, producer)
        if getattr(channel, "confirm_select", None) is not None:
            self._send_confirmed(producer, publish, broker.Confirms.of(channel))
            return
        size = 1
        if len(self.calls) - self.done > 1:  # a single call is a chunk of one anyway
            # Redis pipelines a chunk and confirms it with its replies; a transport that
            # does neither (filesystem, memory) has written each message when publish()
            # returns.
            pipelines = bool(getattr(channel, "create_publish_batch", None)) and getattr(
                channel, "supports_batch_publish", True
            )
            size = BATCH_SIZE if pipelines else 1
        push = publish.push
        while self.done < len(self.calls):
            remaining = self.remaining(answering=self.done > 0)
            broker.bound_sockets(producer, remaining)
            chunk = self.calls[self.done : self.done + size]
            written = self.written
            pushed: list[str] = []
            try:
                # What the push refuses goes through kombu's own batch, written as the
                # block exits, after the push wrote the rest.
                with producer.batch(max_size=len(chunk)) if len(chunk) > 1 else nullcontext():
                    for call in chunk:
                        if written and call.id in written:
                            continue  # taken by Redis in an attempt before this one
                        try:
                            publish(call, remaining)
                        except Exception as error:
                            _blame(error, call)
                            raise
                    if push is not None:
                        ids = list(push.ids)
                        try:
                            push.flush(remaining)
                        except PublishRefused as refused:
                            if refused.refused_call is not None:  # a list of another type
                                setattr(refused, FAILED_CALL, refused.refused_call)
                            raise
                        pushed = ids
            except Exception:
                written.update(pushed)
                raise
            self.done += len(chunk)

    def _send_confirmed(self, producer: Any, publish: _Publish, confirms: broker.Confirms) -> None:
        """AMQP: publish everything, then wait for the broker's acks (one wait, not one each)."""
        first, base = confirms.next_tag, self.done
        self.returns_seen, self.positions = 0, None
        try:
            broker.bound_sockets(producer, self.remaining())
            for call in self.calls[self.done :]:
                try:
                    publish(call, self.remaining())
                except Exception as error:
                    _blame(error, call)
                    raise
                confirms.next_tag += 1
            last = confirms.next_tag - 1
            while True:
                if confirms.returned:
                    self._refuse_returned(confirms, base, first)
                acked = confirms.acked_up_to(last)
                self.done = base + max(0, acked - first + 1)
                if acked >= last:
                    return
                # Confirms may arrive out of order: after a nack, wait for the tags before it.
                if confirms.nacked is not None and acked >= confirms.nacked - 1:
                    call = self.calls[base + confirms.nacked - first]
                    returned = confirms.returned.get(call.id)
                    refused = PublishRefused(
                        f"the broker refused message {confirms.nacked - first + 1} of the batch"
                        + (f": returned, no queue took it: {returned}" if returned else "")
                    )
                    after = confirms.nacked + 1
                    answered = self._note_acked_after(
                        refused, producer, confirms, base, first, after, last
                    )
                    if answered:
                        # Else the broker stopped answering: not blamed, the unanswered calls
                        # are spilled with it, not tried again (a second PUBLISH_TIMEOUT).
                        _blame(refused, call)
                    raise refused
                producer.connection.drain_events(timeout=self.remaining(answering=acked >= first))
        except Exception as error:
            # What the broker confirmed before it failed still counts: a channel error comes
            # after the acks of the messages the channel took before it.
            if confirms.returned:
                self._refuse_returned(confirms, base, first)
            self.done = base + max(0, confirms.acked_up_to(confirms.next_tag - 1) - first + 1)
            if (
                broker.is_refusal(error)
                and not isinstance(error, PublishRefused)
                and not broker.refuses_operation_in_hand(error)
            ):
                # A message refused after its publish (a missing exchange, one too large):
                # the channel closed without saying which, and the error surfaced at a later
                # call's publish or at the wait. No call can be blamed.
                with suppress(AttributeError):
                    delattr(error, FAILED_CALL)
            raise

    def _note_acked_after(
        self,
        refused: PublishRefused,
        producer: Any,
        confirms: broker.Confirms,
        base: int,
        first: int,
        after: int,
        last: int,
    ) -> bool:
        """Set on ``refused`` the ids of the calls of tags ``after`` to ``last`` (those after
        the refused one) that the broker took (other queues than a full one): they are
        published, and must not be sent again. Waits for their confirms within
        PUBLISH_TIMEOUT; one still unanswered then counts as not published (sent again: at
        least once). Returns whether the broker answered them all."""
        answered, waiting = True, after
        try:
            # From the first tag not answered on: to a deleted queue each message is returned
            # in a frame of its own, and a scan from ``after`` per frame is quadratic.
            while (waiting := confirms.unanswered(waiting, last)) <= last:
                producer.connection.drain_events(timeout=self.remaining(answering=True))
                if confirms.returned:
                    self._refuse_returned(confirms, base, first)
        except Exception as error:
            if not broker.is_broker_failure(error):
                raise
            answered = False
        refused.published_after = frozenset(
            self.calls[base + tag - first].id for tag in confirms.acked_between(after, last)
        )
        return answered

    def _refuse_returned(self, confirms: broker.Confirms, base: int, first: int) -> None:
        """A message returned as unroutable is acked next, yet no queue has it: a refusal.
        (RabbitMQ sends the return before the ack, so this runs before that ack counts.)
        Each return once, found by id: to a deleted queue, every message of a batch is
        returned, and a scan of the batch per return is quadratic."""
        if self.positions is None:
            self.positions = {call.id: n for n, call in enumerate(self.calls[base:])}
        for task_id in islice(confirms.returned, self.returns_seen, None):
            n = self.positions.get(task_id)
            if n is not None:
                confirms.on_nack(first + n, multiple=False)
        self.returns_seen = len(confirms.returned)


#: The ids of calls after the confirmed prefix that the broker took all the same: a
#: PublishRefused's field, set on another error too when Redis took part of a chunk.
PUBLISHED_AFTER = "published_after"

#: Set on an exception raised while one call's message was built or handed to the producer
#: (not while a batch was written or confirmed): that call's id.
FAILED_CALL = "deferred_signals_call_id"


def _blame(error: BaseException, call: PendingCall) -> None:
    # A try/except around each call, not a context manager: free unless it raises.
    with suppress(AttributeError, TypeError):  # an exception that takes no attributes
        setattr(error, FAILED_CALL, call.id)


def faulty_call(error: BaseException | None) -> str | None:
    """The id of the call whose own message failed, on our side rather than the broker's
    (``publish()``'s error); None for a broker failure or an error no call can be blamed for.
    """
    if error is None or (broker.is_broker_failure(error) and not broker.is_refusal(error)):
        return None
    return getattr(error, FAILED_CALL, None)


class _Publish:
    """Publishes one call: a message built once per handler route, else ``apply_async``."""

    __slots__ = ("app", "builder", "producer", "push", "send", "shared")

    def __init__(self, app: Any, producer: Any) -> None:
        self.app = app
        self.producer = producer
        self.builder = MessageBuilder(app)
        self._start_batch()

    def _start_batch(self) -> None:
        """What each batch reads afresh, beyond the builder's configuration."""
        #: Redis: messages written as kombu would, without its per-message machinery.
        self.push = RedisPush.of(self.producer) if FAST_REDIS else None
        self.send = sentry.publishing(publish_message)
        #: The last signal call's body as text and its kwargsrepr, and what they came from.
        self.shared: tuple[Any, ...] = ()

    @classmethod
    def of(cls, app: Any, producer: Any) -> _Publish:
        """The publisher of a batch on ``producer``: the one of its previous batch, brought
        up to date as a new one would be (configuration, push, Sentry), or a new one."""
        publish = getattr(producer, "_deferred_signals_publish", None)
        if type(publish) is not cls or publish.app is not app or publish.producer is not producer:
            publish = cls(app, producer)
            with suppress(AttributeError):  # a producer that takes no attributes: per batch
                producer._deferred_signals_publish = publish
            return publish
        publish.builder.refresh()
        publish._start_batch()
        return publish

    def __call__(self, call: PendingCall, remaining: float) -> None:
        task, options = call.handler.task, call.handler.merged.publish
        body = call.body  # a pending call builds its body on each read: once
        text, kwargsrepr = call.text, None
        if call.stored is None:
            # The handlers of one signal sent share its frozen arguments, hence one body:
            # its JSON and its summary are made once for all of them (the ten handlers of a
            # save), not once per handler.
            shared = self.shared
            if (
                shared
                and shared[0] is call.kwargs
                and shared[1] is call.sender
                and shared[2] == call.signal
                and shared[3] is call.at
            ):
                text, kwargsrepr = shared[4], shared[5]
            else:
                kwargsrepr = summary(body)
                # The text only matters to a Redis push, and only if no before_task_publish
                # receiver may change the body.
                if self.push is not None and not celery_signals.before_task_publish.receivers:
                    text = dumps_tree(body)  # built by thaw(): a tree, no cycle
                self.shared = (call.kwargs, call.sender, call.signal, call.at, text, kwargsrepr)
        message = self.builder.build(task, call.id, body, options, text, kwargsrepr)
        if message is None:
            with (
                nullcontext()
                if call.trace is None
                else propagation.continued_per_call(call.trace, call.id)
            ):
                publish_fallback(self.producer, task, call.id, body, options, timeout=remaining)
        elif call.trace is None:
            self.send(self.producer, message, timeout=remaining, push=self.push)
        else:  # a relayed call kept with its request's trace
            with propagation.continued(call.trace, message):
                self.send(self.producer, message, timeout=remaining, push=self.push)


# --- one message to a producer ---------------------------------------------------------------

#: Celery 5.7 passes before_task_publish the retry policy merged with its defaults.
_SIGNALS_GET_MERGED_POLICY = celery.VERSION >= (5, 7)


# Channels that have seen each queue declared: a new channel (a reconnection) declares again.
_declared: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()


def publish_message(
    producer: Producer,
    message: Message,
    *,
    timeout: float | None = None,
    confirm_timeout: float | None = None,
    push: RedisPush | None = None,
) -> None:
    """Publish ``message`` through ``producer`` once, without retrying (``retry=False``).

    Fires ``before_task_publish`` and ``after_task_publish`` as Celery does. Each queue of
    ``message.declare`` is declared the first time this producer's channel publishes to it.
    Errors propagate: the caller decides on retries and deadlines. With ``push`` (a Redis
    channel), the message is queued there when it can be, and written by ``push.flush()``.
    """
    before = celery_signals.before_task_publish
    # Celery's Signal.send returns at once without receivers: not even the call then.
    if before.receivers:
        # A receiver may change the body, headers and properties: they are encoded as they
        # stand after them.
        message.body_json = message.layout = None
        _receivers_raised(
            message,
            before,
            before.send(
                sender=message.task,
                body=message.body,
                exchange=message.exchange,
                routing_key=message.routing_key,
                declare=message.declare,
                headers=message.headers,
                properties=message.properties,
                # Celery < 5.7 hands receivers the retry_policy argument as given (none here).
                retry_policy=message.retry_policy if _SIGNALS_GET_MERGED_POLICY else None,
            ),
        )
    if message.declare:
        channel = producer.channel
        declared = _declared.get(channel)
        if declared is None:
            declared = _declared[channel] = set()
        for entity in message.declare:
            ident = hash(entity)
            if ident not in declared:
                producer.maybe_declare(entity, retry=False)
                declared.add(ident)
    if push is None or not push.add(message):
        kwargs = message.publish_kwargs()
        kwargs["declare"] = None
        kwargs["mandatory"] = True  # AMQP: returned if no queue takes it (see Confirms)
        producer.publish(message.body, timeout=timeout, confirm_timeout=confirm_timeout, **kwargs)
    after = celery_signals.after_task_publish
    if after.receivers:
        _receivers_raised(
            message,
            after,
            after.send(
                sender=message.task,
                body=message.body,
                headers=message.headers,
                exchange=message.exchange,
                routing_key=message.routing_key,
            ),
        )
    sent = celery_signals.task_sent
    if sent.receivers:  # Celery's deprecated signal, still sent by 5.x
        _receivers_raised(
            message,
            sent,
            sent.send(
                sender=message.task,
                task_id=message.headers["id"],
                task=message.task,
                args=message.body[0],
                kwargs=message.body[1],
                eta=message.headers["eta"],
                taskset=message.headers["group"],
            ),
        )


def _receivers_raised(message: Message, signal: Any, responses: Any) -> None:
    """Log each receiver of ``signal`` that raised while ``message`` was published.

    Celery's ``Signal.send`` catches a receiver's exception and logs it naming the receiver
    only, and ``apply_async`` publishes all the same: so do we. A receiver's failure changes
    nothing of what is published (it is no failure to publish: spilled, the call would be
    published twice), but the log names the handler and the call it happened for.
    """
    for receiver, response in responses or ():
        if isinstance(response, BaseException):
            logger.warning(
                "deferred_signals: a %s receiver, %s, raised %r while %s [%s] was published; "
                "the call is published all the same (as Celery's apply_async does)",
                getattr(signal, "name", None) or "Celery signal",
                _name(receiver),
                response,
                message.task,
                message.headers["id"],
            )


def _name(receiver: Any) -> str:
    qualname = getattr(receiver, "__qualname__", None)
    if qualname is None:
        return repr(receiver)
    return f"{getattr(receiver, '__module__', '?')}.{qualname}"


def publish_fallback(
    producer: Producer | None,
    task: Any,
    call_id: str,
    body: dict[str, Any],
    options: Mapping[str, Any],
    *,
    timeout: float | None = None,
    confirm_timeout: float | None = None,
) -> None:
    """The per-call path: ``Task.apply_async`` itself, once, without Celery's retry policy."""
    task.apply_async(
        kwargs=body,
        task_id=call_id,
        producer=producer,
        # Celery would saferepr() the whole tagged body: a short summary reads better too.
        argsrepr="()",
        kwargsrepr=summary(body),
        retry=False,
        timeout=timeout,
        confirm_timeout=confirm_timeout,
        **{**options, "mandatory": True},  # AMQP: returned if no queue takes it
    )


# --- connections of our own ----------------------------------------------------------------


def reset() -> None:
    """Forget pooled connections and the cooldown (settings changed, tests)."""
    broker.reset()
    cooldown.clear()
