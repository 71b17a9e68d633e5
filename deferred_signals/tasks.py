"""One Celery task per deferred handler, and what it does on the worker."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject, Retry
from django.db import InterfaceError, OperationalError

from . import deadletters, registry
from .calls import mark_handler_failed, running
from .conf import WORKER_OPTIONS, conf
from .exceptions import MalformedMessageError
from .execution import (
    MESSAGE_KEYS,
    MESSAGE_VERSION,
    OPTIONAL_KEYS,
    close_connections,
    decode_call,
)
from .registry import Handler
from .retries import (
    kind_of,
    outage_countdown,
    outage_retry,
    retried,
    retry_after_database_error,
    retry_or_reraise,
)

__all__ = ["MESSAGE_KEYS", "MESSAGE_VERSION", "OPTIONAL_KEYS", "create_task", "decode_call"]

logger = logging.getLogger("deferred_signals")

#: Connection-level database errors: retried for ``db_retry_window`` seconds by default.
DATABASE_ERRORS = (OperationalError, InterfaceError)
#: Celery's own defaults for the options it reads from the task instead of from its config.
CELERY_TASK_DEFAULTS = {
    "max_retries": Task.max_retries,
    "default_retry_delay": Task.default_retry_delay,
}
#: Task attributes read from the handler's options: the Celery setting an unset one falls
#: back to, or None for Celery's task default.
TASK_OPTIONS: dict[str, str | None] = {
    **WORKER_OPTIONS,
    "max_retries": None,
    "default_retry_delay": None,
}


#: An option no layer of the handler's settings sets: Celery's app configuration decides.
_FROM_APP = object()


class _Resolved:
    """What a handler task reads per message, computed once per configuration.

    ``generation`` is :attr:`conf.generation <deferred_signals.conf.Settings.generation>` when
    this was computed: settings changes and a handler registered again bump it.
    """

    __slots__ = ("app", "generation", "handler", "values")

    def __init__(self, generation: int, handler: Handler | None) -> None:
        self.generation = generation
        self.handler = handler
        merged = handler.merged.values if handler is not None else {}
        self.values = {
            key: merged[key]
            if key in merged
            else (_FROM_APP if setting is not None else CELERY_TASK_DEFAULTS[key])
            for key, setting in TASK_OPTIONS.items()
        }
        #: key -> (what ``app.conf`` said, the app.conf changes it was read under).
        self.app: dict[str, tuple[Any, tuple[Any, ...]]] = {}


def _option(key: str) -> property:
    """A task attribute read from the handler's merged options, cached per handler.

    Celery reads these from the task while it works, so they follow ``override_settings``
    (the cache is dropped on every settings change); an unset option falls back to the
    Celery app's own configuration, as for any task.
    """
    celery_setting = TASK_OPTIONS[key]

    def get(self: DeferredHandlerTask) -> Any:
        overrides = self._overrides
        if key in overrides:
            return overrides[key]
        value = self._resolve().values[key]
        if value is not _FROM_APP:
            return value
        assert celery_setting is not None  # only options with a Celery setting are _FROM_APP
        return self._from_app(key, celery_setting)

    def set_(self: DeferredHandlerTask, value: Any) -> None:
        # e.g. ``celery control rate_limit`` sets the attribute on the live task.
        self._overrides = {**self._overrides, key: value}

    return property(get, set_)


class DeferredHandlerTask(Task):  # type: ignore[type-arg]
    """Base class of the per-handler tasks. Users never call these tasks directly."""

    ignore_result = True
    typing = False
    #: Checks each message before Celery unpacks it in the worker's main process.
    Strategy = "deferred_signals.strategy:strategy"
    #: Whatever the project's task_serializer says: these messages are JSON, never pickle.
    serializer = "json"
    _overrides: Mapping[str, Any] = {}
    _resolved: _Resolved | None = None

    acks_late = _option("acks_late")
    reject_on_worker_lost = _option("reject_on_worker_lost")
    rate_limit = _option("rate_limit")
    time_limit = _option("time_limit")
    soft_time_limit = _option("soft_time_limit")
    max_retries = _option("max_retries")
    default_retry_delay = _option("default_retry_delay")

    @property
    def handler(self) -> Handler:
        handler = self._resolve().handler
        if handler is None:  # the task outlived a handler removed in tests
            raise MalformedMessageError(f"no deferred handler is registered as {self.name!r}")
        return handler

    def _resolve(self) -> _Resolved:
        resolved = self._resolved
        generation = conf.generation
        if resolved is None or resolved.generation != generation:
            resolved = self._resolved = _Resolved(generation, registry.get(self.name))
        return resolved

    def _from_app(self, key: str, setting: str) -> Any:
        # Reading app.conf through Django's settings costs ~20 us: once per value. A change
        # made on app.conf itself lands in its ``changes``; Django settings bump the generation.
        app_conf = self.app.conf
        changes = app_conf.changes or {}
        stamp = (app_conf, len(changes), changes.get(setting))
        resolved = self._resolve()
        seen = resolved.app.get(key)
        if seen is None or not _same(seen[1], stamp):
            seen = resolved.app[key] = (app_conf.get(setting), stamp)
        return seen[0]


def _same(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    return old[0] is new[0] and old[1] == new[1] and old[2] is new[2]


_tasks: dict[str, Any] = {}


def create_task(handler: Handler) -> Any:
    """The handler's task, created once per name with ``shared_task`` semantics.

    The task finds its handler in the registry by its own name at run time, so a handler
    registered again under the same name (tests, reloads) is served by the same task. Each
    alias gets a task too, which the registry resolves to the same handler.
    """
    for alias in handler.aliases:
        _task_named(alias, handler)
    return _task_named(handler.name, handler)


def _task_named(name: str, handler: Handler) -> Any:
    task = _tasks.get(name)
    if task is not None:
        return task

    def run(self: DeferredHandlerTask, *args: Any, **body: Any) -> None:
        run_task(self, args, body)

    func = handler.func
    run.__name__ = getattr(func, "__name__", "handler")
    run.__qualname__ = getattr(func, "__qualname__", run.__name__)
    run.__module__ = getattr(func, "__module__", __name__)
    run.__doc__ = func.__doc__
    task = _tasks[name] = shared_task(name=name, bind=True, base=DeferredHandlerTask)(run)
    return task


def run_task(task: DeferredHandlerTask, args: tuple[Any, ...], body: Any) -> None:
    """Body of every handler task: decode, look the rows up, call, retry per settings."""
    request = task.request
    call_id = str(request.id)
    try:
        handler = task.handler
        if args:
            raise MalformedMessageError("positional arguments are not accepted")
        call = decode_call(handler, body)
    except MalformedMessageError as error:
        logger.error(
            "Rejected message %s for deferred handler task %s: %s", call_id, task.name, error
        )
        deadletters.record(
            call_id=call_id, handler=task.name, body=body, exception=error, attempts=0
        )
        raise Reject(f"malformed message: {error}", requeue=False) from None
    except DATABASE_ERRORS as exc:  # a registered codec's decode() met a database outage
        window = handler.merged.get("db_retry_window")
        try:
            if window:
                close_connections()
                retry_after_database_error(task, handler, body, exc, window)  # or returns
            kept = keep(task, handler, body, exc)  # Retry when its dead letter cannot be written
        except Retry as retry:
            # The handler never started (no handler_started, nor handler_failed), yet the
            # attempt is spent and Celery retries the call: counted as the outage's retry.
            attempt = request.retries + 1
            with running(call_id, handler.name, attempt, body):
                retried(handler, call_id, attempt, exc, retry, True)
            raise
        if kept:
            announce(task, handler, exc)
        mark_handler_failed(exc)
        raise
    attempt = request.retries + 1
    try:
        call.run(call_id, attempt, final=False)
    except Exception as exc:
        window = handler.merged.get("db_retry_window")
        database = isinstance(exc, DATABASE_ERRORS) and bool(window)
        try:
            if database:
                close_connections()
                retry_after_database_error(task, handler, body, exc, window)
            else:
                retry_or_reraise(task, handler, body, exc)
            # Failed for good. The message is the call's only copy: written before anyone is
            # told the failure is final, since a dead letter that cannot be written retries it.
            database = True
            kept = keep(task, handler, body, exc)
        except Retry as retry:
            call.failed(call_id, attempt, exc, final=False)
            with call.serving(call_id, attempt):
                retried(handler, call_id, attempt, exc, retry, database)
            raise
        except Reject:
            # Celery could not publish the retry and rejects the message without requeue:
            # without a dead letter the call would be gone.
            call.failed(call_id, attempt, exc, final=True)
            logger.error(
                "Deferred handler %s [%s] failed on attempt %d (%s) and its retry could not "
                "be published: kept as a dead letter",
                handler.name, call_id, attempt, kind_of(exc),
            )  # fmt: skip
            dead_letter(task, handler, body, exc)
            raise
        call.failed(call_id, attempt, exc, final=True)
        logger.error(
            "Deferred handler %s [%s] failed for good on attempt %d: %s",
            handler.name, call_id, attempt, kind_of(exc),
        )  # fmt: skip
        if kept:
            announce(task, handler, exc)
        mark_handler_failed(exc)
        raise


def dead_letter(
    task: DeferredHandlerTask, handler: Handler, body: dict[str, Any], exc: Exception
) -> None:
    """Keep a call that failed for good, with its traceback, so it can be replayed."""
    deadletters.record(
        call_id=str(task.request.id),
        handler=handler.name,
        body=body,
        exception=exc,
        traceback=_traceback(exc),
        attempts=task.request.retries + 1,
    )


def keep(task: DeferredHandlerTask, handler: Handler, body: dict[str, Any], exc: Exception) -> bool:
    """Write the dead letter of a call that failed for good; :func:`announce` it once the
    failure is reported. False when dead letters are off.

    Once the worker acknowledges the message, the dead letter is the call's only copy. When
    its database cannot be reached (down too, as in an outage past ``db_retry_window``),
    the call is retried instead, with the outage's backoff and outside
    the handler's ``max_retries``: this raises :class:`~celery.exceptions.Retry`, and the
    call runs again or becomes a dead letter once the database answers.
    """
    if not conf.dead_letters:
        return False
    request = task.request
    try:
        return deadletters.write(
            call_id=str(request.id),
            handler=handler.name,
            body=body,
            exception=exc,
            traceback=_traceback(exc),
            attempts=request.retries + 1,
        )
    except Exception as error:
        deadletters.unwritten(str(request.id), handler.name, exc)
        if not deadletters.unreachable(error):
            return False  # it would fail the same way again: Celery's failure handling goes on
    if request.is_eager:  # apply(): no message to keep, its caller sees the exception
        return False
    close_connections()
    countdown = outage_countdown(task, body.get("dbr", 0))
    logger.error(
        "Deferred handler %s [%s] failed for good on attempt %d (%s), but its dead letter could "
        "not be written: retry in %.1f s rather than drop the call",
        handler.name, request.id, request.retries + 1, kind_of(exc), countdown,
    )  # fmt: skip
    raise outage_retry(task, body, exc, countdown)


def announce(task: DeferredHandlerTask, handler: Handler, exc: Exception) -> None:
    """Send ``call_dead_lettered`` for the dead letter :func:`keep` wrote."""
    deadletters.announce(
        handler=handler.name,
        call_id=str(task.request.id),
        exception=exc,
        attempts=task.request.retries + 1,
    )


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
