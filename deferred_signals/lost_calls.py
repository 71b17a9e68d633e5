"""Calls the worker's pool stops from outside the handler: kept as dead letters.

A hard ``time_limit`` kills the prefork child running the handler, and so does the OOM killer
or a stray ``SIGKILL``; the task's own ``except`` block never runs, so it cannot keep the
call. Celery reports both in the worker's main process with its ``task_failure`` signal,
sent only once it has decided the message is gone (acknowledged or rejected without requeue,
not retried): that is where the call becomes a dead letter. A message Celery puts back on the
queue runs again and is never kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import celery
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import signals as celery_signals

from . import letter_writer, registry
from .tasks import DeferredHandlerTask

logger = logging.getLogger("deferred_signals")

#: How many call ids to remember: Celery sends ``task_failure`` twice for one hard time limit
#: (``Request.on_failure``, then ``on_timeout``), and the second must not count again.
RECENT = 1024

#: Celery's two sends for one hard time limit come within moments: a call lost again later
#: is a new loss (its replay's), kept again.
SAME_LOSS_SECONDS = 60.0

#: Deliveries kept lately (monotonic time), oldest first; a new delivery (a replay) clears
#: its id.
_kept: OrderedDict[str, float] = OrderedDict()
#: The retries of the retried deliveries received lately, by call id.
_retries: OrderedDict[str, int] = OrderedDict()
_lock = threading.Lock()


def on_task_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    kwargs: Any = None,
    einfo: Any = None,
    **_: Any,
) -> None:
    """Keep a deferred call its pool lost, once, unless Celery redelivers its message."""
    if not isinstance(exception, (TimeLimitExceeded, WorkerLostError)) or not task_id:
        return  # anything else was raised inside the task, which kept its own dead letter
    if not isinstance(sender, DeferredHandlerTask):
        return
    handler = registry.get(sender.name)
    if handler is None:
        return
    # Requeued (acks_late, task_acks_on_timeout=False): Request.on_timeout sends task_failure
    # all the same, before it puts the message back.
    # Celery before 5.7 has one setting for both, acks_on_failure_or_timeout.
    acks = getattr(sender, "acks_on_timeout", None)
    if acks is None:
        acks = getattr(sender, "acks_on_failure_or_timeout", True)
    requeued = sender.acks_late and not acks
    if isinstance(exception, TimeLimitExceeded) and requeued:
        return
    with _lock:
        now = time.monotonic()
        _forget_old(now)
        if task_id in _kept:
            return
        _kept[task_id] = now
        if len(_kept) > RECENT:
            _kept.popitem(last=False)
        _listen(True)  # while a call is kept: a new delivery of it may be lost again
    request = sender.request  # Celery 5.7 pushes the message's context for on_failure's send
    if request.id == task_id:
        attempts = (request.retries or 0) + 1
    else:  # Celery before 5.7: as the message said when it was received
        with _lock:
            attempts = _retries.get(task_id, 0) + 1
    what = (
        "was stopped by its hard time limit"
        if isinstance(exception, TimeLimitExceeded)
        else "lost its worker process"
    )
    logger.error(
        "Deferred handler %s [%s] %s on attempt %d: kept as a dead letter",
        handler.name, task_id, what, attempts,
    )  # fmt: skip
    # Written off the main process's event loop: a hung database must not stop the worker.
    letter_writer.keep(
        call_id=task_id,
        handler=handler.name,
        body=kwargs,
        exception=exception,
        traceback=str(getattr(einfo, "traceback", "") or ""),
        attempts=attempts,
    )


def on_task_received(request: Any = None, **_: Any) -> None:
    """A new delivery of a call (a replay) may be lost and kept again; a retried one's count
    is kept for the dead letter (Celery before 5.7 sends ``task_failure`` without it)."""
    task_id = str(getattr(request, "id", ""))
    retries = (getattr(request, "request_dict", None) or {}).get("retries") or 0
    if not (_kept or retries or task_id in _retries):
        return
    with _lock:
        _forget_old(time.monotonic())
        _kept.pop(task_id, None)
        if retries and _COUNTS_RETRIES:
            _retries[task_id] = int(retries)
            if len(_retries) > RECENT:
                _retries.popitem(last=False)
        else:
            _retries.pop(task_id, None)
        if not _kept and not _COUNTS_RETRIES:
            _listen(False)  # under the lock: a loss kept meanwhile keeps it connected


def _forget_old(now: float) -> None:
    """Drop the calls kept longer than :data:`SAME_LOSS_SECONDS` ago (under ``_lock``)."""
    while _kept:
        oldest = next(iter(_kept.values()))
        if now - oldest < SAME_LOSS_SECONDS:
            return
        _kept.popitem(last=False)


#: Celery before 5.7 sends ``task_failure`` without the message's context: the retries of
#: each delivery are read when it is received. From 5.7 on, the receiver listens only while
#: a lost call is kept, so a worker's main process pays nothing per message (~4 us a call
#: with a receiver connected, in the process that sets a prefork worker's pace).
_COUNTS_RETRIES = celery.VERSION < (5, 7)
_UID = "deferred_signals.lost_calls"


def _listen(on: bool) -> None:
    if on:
        celery_signals.task_received.connect(on_task_received, dispatch_uid=_UID)
    else:
        celery_signals.task_received.disconnect(on_task_received, dispatch_uid=_UID)


celery_signals.task_failure.connect(on_task_failure, dispatch_uid=_UID)
if _COUNTS_RETRIES:
    _listen(True)
