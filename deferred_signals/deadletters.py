"""Dead letters: calls that failed for good, kept with their message so they can be replayed."""

from __future__ import annotations

import logging
from typing import Any

from django.db import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    connections,
    router,
    transaction,
)
from django.utils import timezone
from kombu.utils import json as kombu_json

from . import registry, signals
from .conf import conf

logger = logging.getLogger("deferred_signals")

#: Keys the worker adds to a message for its own retries; a replay starts afresh without them.
WORKER_KEYS = ("dbf", "dbr")
#: The errors of a database that is down, hung up or refusing connections. Not all of them
#: are: SQLite raises OperationalError for a missing table or column, MySQL for an unknown
#: column, PostgreSQL for a statement timeout. :func:`unreachable` tells them apart.
UNREACHABLE = (OperationalError, InterfaceError)


def body_text(body: Any) -> str:
    """The JSON text a replay publishes again: kombu's JSON, as Celery wrote the message."""
    if isinstance(body, dict):
        body = {key: value for key, value in body.items() if key not in WORKER_KEYS}
    return kombu_json.dumps(body)


def record(
    *,
    call_id: str,
    handler: str,
    body: Any,
    exception: BaseException,
    traceback: str = "",
    attempts: int = 1,
) -> bool:
    """Record (or update, for a call id seen before) the dead letter of one call.

    ``body`` is the message body (a dict), or the raw text of a message that was not even
    one. Never raises: when the database cannot take the row, the call id is logged at ERROR
    and the caller carries on with Celery's own failure handling. Returns whether it was kept.
    """
    try:
        kept = write(
            call_id=call_id,
            handler=handler,
            body=body,
            exception=exception,
            traceback=traceback,
            attempts=attempts,
        )
    except Exception:
        unwritten(call_id, handler, exception)
        return False
    if kept:
        announce(handler=handler, call_id=call_id, exception=exception, attempts=attempts)
    return kept


def write(
    *,
    call_id: str,
    handler: str,
    body: Any,
    exception: BaseException,
    traceback: str = "",
    attempts: int = 1,
) -> bool:
    """The row of :func:`record`, without ``call_dead_lettered`` and raising what the
    database raised; False when dead letters are off."""
    if not conf.dead_letters:
        return False
    from .models import NAME_LENGTH, DeadLetter  # models load once Django's apps are ready

    now = timezone.now()
    # A forged message's id or task name may hold NUL too (its headers are any JSON strings).
    call_id = _text(call_id)
    fields: dict[str, Any] = {
        "handler": _text(handler[:NAME_LENGTH]),
        "body": _text(body if isinstance(body, str) else body_text(body)),
        "exception": _kind(exception)[:NAME_LENGTH],
        "message": _text(str(exception)),
        "traceback": _text(traceback),
        "attempts": attempts,
        "last_failed_at": now,
        # A replayed call that failed again is a dead letter again: counted, replayed by
        # --all, kept by prune.
        "replayed_at": None,
    }
    using = router.db_for_write(DeadLetter)
    rows = DeadLetter.objects.using(using)

    def upsert() -> None:
        with transaction.atomic(using=using):
            if not rows.filter(call_id=call_id).update(**fields):
                try:
                    with transaction.atomic(using=using):
                        rows.create(call_id=call_id, first_failed_at=now, **fields)
                except IntegrityError:  # another worker recorded the same call just now
                    rows.filter(call_id=call_id).update(**fields)

    try:
        upsert()
    except UNREACHABLE:
        if not _reachable(using):
            raise
        # The database answered but failed the write (a deadlock, a timeout): once more; a
        # second failure is the write's own (a missing table), for unreachable() to tell.
        upsert()
    return True


def unreachable(error: BaseException) -> bool:
    """Whether a :func:`write` that raised ``error`` may succeed later, once the dead-letter
    database can be reached again. Not for an error of a database that answers: a missing
    table (SQLite's OperationalError) would fail every retry the same way, for ever."""
    if not isinstance(error, UNREACHABLE):
        return False
    from .models import DeadLetter

    return not _reachable(router.db_for_write(DeadLetter))


def _reachable(using: str) -> bool:
    # Django drops a connection whose rollback failed, and has none after a failed connect.
    connection = connections[using]
    if connection.connection is None:
        return False
    try:
        return bool(connection.is_usable())
    except Exception:
        return False


def _kind(exception: BaseException) -> str:
    """The exception's type as a dead letter names it: ``module.QualName``."""
    kind = type(exception)
    return f"{kind.__module__}.{kind.__qualname__}"


def _text(text: str) -> str:
    # PostgreSQL's text refuses NUL, which a raw body or an exception's text may hold.
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def unwritten(call_id: str, handler: str, exception: BaseException) -> None:
    """Log, inside the ``except`` block of a failed :func:`write`, that it failed."""
    # Not the exception's text: it may quote the call's arguments.
    logger.exception(
        "Could not record the dead letter of call %s (deferred handler %s, %s)",
        call_id,
        handler,
        _kind(exception)[:200],
    )


def announce(*, handler: str, call_id: str, exception: BaseException, attempts: int) -> None:
    """Send ``call_dead_lettered`` for a dead letter :func:`write` kept."""
    registered = registry.get(handler)
    signals.call_dead_lettered.send(
        None if registered is None else registered.func,
        handler=handler,
        call_id=call_id,
        exception=exception,
        attempts=attempts,
    )
