"""Calls for a handler name this worker has no task for: kept as dead letters.

A handler renamed or moved without ``aliases=[...]``, or removed, while messages were queued
under its name, and a worker running older code than the process that published (a rolling
deploy): Celery discards such a message as an unregistered task. One that has the shape of
our calls is kept as a dead letter under the name it carries, so ``status`` counts it and
``replay`` publishes it again once a handler answers to that name. Other producers' messages
are left to Celery.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals as celery_signals
from celery.exceptions import NotRegistered
from kombu.exceptions import ContentDisallowed

from . import letter_writer
from .conf import conf

logger = logging.getLogger("deferred_signals")


def on_task_unknown(message: Any = None, name: Any = None, id: Any = None, **_: Any) -> None:
    """Keep a call Celery discarded for want of a task named ``name`` (``task_unknown``)."""
    from .strategy import message_problem  # the worker's own imports; a web process never runs this

    if message is None or not isinstance(name, str) or not conf.dead_letters:
        return  # DEAD_LETTERS=False: Celery's own error is the whole story
    try:
        problem = message_problem(message)
    except ContentDisallowed:  # a content type this worker does not accept: not one of ours
        return
    if problem is not None:
        return  # not a call of ours (or not one we could replay): Celery's log is enough
    headers = message.headers
    retries = headers.get("retries") or 0
    logger.error(
        "Kept message %s as a dead letter: no deferred handler answers to %r in this worker "
        "(renamed or moved without aliases=[...], removed, or a worker older than the code "
        "that published it); replay it once one does",
        id, name,
    )  # fmt: skip
    # Off the event loop: a hung database must not stop the worker.
    letter_writer.keep(
        call_id=str(id),
        handler=name,
        body=message.payload[1],
        exception=NotRegistered(name),
        attempts=retries,
    )


celery_signals.task_unknown.connect(on_task_unknown, dispatch_uid="deferred_signals.unregistered")
