"""When and how a deferred call is retried: the handler's own retry options, and outages.

The handler task (:mod:`tasks`) asks here once a run failed: :func:`retry_or_reraise` applies
the handler's ``autoretry_for`` semantics with its options read at run time, and a database
outage is retried with backoff for ``db_retry_window`` seconds
(:func:`retry_after_database_error`), counted apart in the message (``"dbr"``) so it does not
spend the handler's ``max_retries``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import TYPE_CHECKING, Any

from celery.exceptions import Retry
from celery.utils.time import get_exponential_backoff_interval

from . import redelivery, signals
from .registry import Handler

if TYPE_CHECKING:
    from .tasks import DeferredHandlerTask

logger = logging.getLogger("deferred_signals")

#: The longest wait between two attempts during a database outage, in seconds.
DB_RETRY_BACKOFF_MAX = 60


def retried(
    handler: Handler, call_id: str, attempt: int, exc: Exception, retry: Retry, database: bool
) -> None:
    """Log a retry (database-outage retries log their own line) and send ``handler_retried``."""
    countdown = float(retry.when) if isinstance(retry.when, (int, float)) else None
    if not database:
        logger.warning(
            "Deferred handler %s [%s] failed on attempt %d (%s); retry in %s s",
            handler.name, call_id, attempt, kind_of(exc),
            "?" if countdown is None else f"{countdown:.1f}",
        )  # fmt: skip
    signals.handler_retried.send(
        handler.func,
        handler=handler.name,
        call_id=call_id,
        attempt=attempt,
        exception=exc,
        countdown=countdown,
        database=database,
    )


def kind_of(exc: BaseException) -> str:
    """An exception for a log line at INFO and above: its type, never its text, which may
    quote the call's arguments (the dead letter keeps the text and the traceback)."""
    kind = type(exc)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def retry_or_reraise(
    task: DeferredHandlerTask, handler: Handler, body: dict[str, Any], exc: Exception
) -> None:
    """Celery's ``autoretry_for`` semantics, with the options read at run time.

    Retries spent on a database outage do not count against the handler's ``max_retries``:
    ``request.retries`` counts every retry, and the message's "dbr" says how many were the
    outage's. Returns when the exception is not retried (the caller re-raises it).
    """
    options = handler.merged
    if not isinstance(exc, options.autoretry_for) or isinstance(exc, options.dont_autoretry_for):
        return
    retries = task.request.retries
    max_retries = task.max_retries
    if max_retries is not None and retries - body.get("dbr", 0) >= max_retries:
        return  # out of retries
    if options.get("retry_backoff"):
        countdown = get_exponential_backoff_interval(
            factor=int(max(1.0, float(options.get("retry_backoff")))),
            retries=retries - body.get("dbr", 0),
            maximum=int(options.get("retry_backoff_max")),
            full_jitter=bool(options.get("retry_jitter")),
        )
    else:
        countdown = task.default_retry_delay
    # The outage, if any, is over: a later one gets a window of its own.
    kwargs = {key: value for key, value in body.items() if key != "dbf"}
    raise task.retry(exc=exc, countdown=countdown, kwargs=kwargs, max_retries=retries + 1)


def retry_after_database_error(
    task: DeferredHandlerTask, handler: Handler, body: dict[str, Any], exc: Exception, window: float
) -> None:
    """Retry a call the database failed, with backoff, until ``window`` seconds after the
    first failure; returns once the window is spent (the caller makes a dead letter)."""
    now = time.time()
    first, outage_retries = body.get("dbf", now), body.get("dbr", 0)
    left = window - (now - first)
    if left <= 0:
        logger.error(
            "Deferred handler %s [%s]: the database has failed for %.0f s, past db_retry_window "
            "(%s s); no more retries for the outage after %d: %s",
            handler.name, task.request.id, now - first, window, outage_retries, kind_of(exc),
        )  # fmt: skip
        return
    countdown = outage_countdown(task, outage_retries, left)
    logger.warning(
        "Deferred handler %s [%s]: database error, retry in %.1f s (%.0f s left of "
        "db_retry_window): %s",
        handler.name, task.request.id, countdown, left, kind_of(exc),
    )  # fmt: skip
    raise outage_retry(task, body, exc, countdown, dbf=first)


def outage_countdown(
    task: DeferredHandlerTask, outage_retries: int, left: float = math.inf
) -> float:
    """The wait before an outage's next retry: :func:`backoff`, within :func:`longest_wait`
    and what is ``left`` of the window, jittered to spread the herd."""
    return min(backoff(outage_retries), longest_wait(task), left) * random.uniform(0.5, 1.0)


def outage_retry(
    task: DeferredHandlerTask, body: dict[str, Any], exc: Exception, countdown: float, **keys: Any
) -> Retry:
    """Celery's retry of a call in an outage: one more outage retry (``"dbr"``) in its
    message, with ``keys`` added, and not taken from the handler's own ``max_retries``."""
    return task.retry(
        exc=exc,
        countdown=countdown,
        kwargs={**body, **keys, "dbr": body.get("dbr", 0) + 1},
        max_retries=task.request.retries + 1,
    )


def backoff(outage_retries: int) -> float:
    """2 ** ``outage_retries`` seconds, before the cap of :func:`longest_wait`. Bounded: a
    call retried for want of its dead letter counts on for as long as the database is down,
    and 2.0 ** 1024 raises OverflowError, which would fail (and drop) the call."""
    return 2.0 ** min(outage_retries, 16)


def longest_wait(task: DeferredHandlerTask) -> float:
    """The longest countdown of a retry of our own: :data:`DB_RETRY_BACKOFF_MAX`, and half
    Redis's ``visibility_timeout`` at most, or Redis would hand the waiting retry out again
    (and each copy, failing, retries in turn)."""
    timeout = redelivery.visibility_timeout(task.app)
    return DB_RETRY_BACKOFF_MAX if timeout is None else min(DB_RETRY_BACKOFF_MAX, timeout / 2)
