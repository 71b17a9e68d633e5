"""Publishing committed calls to the broker, bounded in time and confirmed.

A commit must never wait on the broker longer than ``PUBLISH_TIMEOUT``, whatever the broker
does: refuse connections, accept them and never answer, or swallow bytes during a partition.
So calls go out over connections of our own, whose connect and socket operations are bounded
by that timeout, with publisher confirms on AMQP (Redis answers every command, so its reply
is the confirmation). A message counts as published only once confirmed; the caller spills
the rest. After a failure the process stops trying for ``PUBLISH_COOLDOWN`` seconds, so an
outage costs one slow request per process and cooldown, not a timeout on every request.

An attempt's sending is :mod:`sending`'s (a batch over one producer, counted as the broker
confirms it) and each message's hand-over :mod:`producer`'s; here: the attempts and their
shared deadline, the cooldown, Celery's eager mode, and what a publish tells its caller.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from celery._state import get_current_app

from . import broker, signals
from .calls import HANDLER_FAILED, committed_at
from .conf import conf
from .exceptions import BrokerUnavailable
from .producer import publish_fallback
from .sending import FAILED_CALL, PUBLISHED_AFTER, Attempt, blame

if TYPE_CHECKING:
    from .dispatch import PendingCall

logger = logging.getLogger("deferred_signals")

#: A failure this soon after the attempt started is a stale pooled connection (the broker
#: restarted, an idle connection was closed): one retry on a fresh connection is cheap.
STALE_CONNECTION_WINDOW = 0.25
#: Calls named in a batch's log line; a relay's batch of 500 says "and 490 more".
LOGGED_CALLS = 10


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
    progress = Attempt(calls, deadline=deadline)
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
            blame(error, call)
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


def faulty_call(error: BaseException | None) -> str | None:
    """The id of the call whose own message failed, on our side rather than the broker's
    (``publish()``'s error); None for a broker failure or an error no call can be blamed for.
    """
    if error is None or (broker.is_broker_failure(error) and not broker.is_refusal(error)):
        return None
    return getattr(error, FAILED_CALL, None)


# --- connections of our own ----------------------------------------------------------------


def reset() -> None:
    """Forget pooled connections and the cooldown (settings changed, tests)."""
    broker.reset()
    cooldown.clear()
