"""One Celery task per deferred handler, and what it does on the worker."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from asgiref.sync import async_to_sync, iscoroutinefunction
from celery import Task, shared_task
from celery.exceptions import Reject
from celery.utils.time import get_exponential_backoff_interval
from django.core.exceptions import ObjectDoesNotExist
from django.dispatch import Signal

from . import registry
from .conf import WORKER_OPTIONS
from .decoder import Decoder, resolve, snapshot_instance
from .exceptions import MalformedMessageError
from .registry import Handler

logger = logging.getLogger("deferred_signals")

MESSAGE_VERSION = 1
MESSAGE_KEYS = frozenset({"v", "signal", "sender", "kwargs"})
#: Keys a message may carry besides: "at", when the call's transaction committed (epoch
#: seconds, for ``current_call()``); "dbf", when the worker first met a database outage.
OPTIONAL_KEYS = frozenset({"at", "dbf"})
#: Celery's own defaults for the options it reads from the task instead of from its config.
CELERY_TASK_DEFAULTS = {
    "max_retries": Task.max_retries,
    "default_retry_delay": Task.default_retry_delay,
}


def _option(key: str, celery_setting: str | None) -> property:
    """A task attribute read from the handler's merged options at every access.

    Celery reads these from the task while it works, so computing them from
    ``settings.DEFERRED_SIGNALS`` each time keeps ``override_settings`` honest; an
    unset option falls back to the Celery app's own configuration, as for any task.
    """

    def get(self: DeferredHandlerTask) -> Any:
        if key in self._overrides:
            return self._overrides[key]
        handler = registry.get(self.name)
        if handler is not None and key in handler.merged.values:
            return handler.merged.values[key]
        if celery_setting is None:
            return CELERY_TASK_DEFAULTS[key]
        return self.app.conf.get(celery_setting)

    def set_(self: DeferredHandlerTask, value: Any) -> None:
        # e.g. ``celery control rate_limit`` sets the attribute on the live task.
        self._overrides = {**self._overrides, key: value}

    return property(get, set_)


class DeferredHandlerTask(Task):  # type: ignore[type-arg]
    """Base class of the per-handler tasks. Users never call these tasks directly."""

    ignore_result = True
    typing = False
    #: Whatever the project's task_serializer says: these messages are JSON, never pickle.
    serializer = "json"
    _overrides: Mapping[str, Any] = {}

    acks_late = _option("acks_late", WORKER_OPTIONS["acks_late"])
    reject_on_worker_lost = _option(
        "reject_on_worker_lost", WORKER_OPTIONS["reject_on_worker_lost"]
    )
    rate_limit = _option("rate_limit", WORKER_OPTIONS["rate_limit"])
    time_limit = _option("time_limit", WORKER_OPTIONS["time_limit"])
    soft_time_limit = _option("soft_time_limit", WORKER_OPTIONS["soft_time_limit"])
    max_retries = _option("max_retries", None)
    default_retry_delay = _option("default_retry_delay", None)

    @property
    def handler(self) -> Handler:
        handler = registry.get(self.name)
        if handler is None:  # the task outlived a handler removed in tests
            raise MalformedMessageError(f"no deferred handler is registered as {self.name!r}")
        return handler


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
    try:
        handler = task.handler
        if args:
            raise MalformedMessageError("positional arguments are not accepted")
        call = decode_call(handler, body)
    except MalformedMessageError as error:
        logger.error(
            "Rejected message %s for deferred handler task %s: %s",
            task.request.id,
            task.name,
            error,
        )
        raise Reject(f"malformed message: {error}", requeue=False) from None
    try:
        call.run()
    except Exception as exc:
        retry_or_reraise(task, handler, exc)
        raise


def retry_or_reraise(task: DeferredHandlerTask, handler: Handler, exc: Exception) -> None:
    """Celery's ``autoretry_for`` semantics, with the options read at run time."""
    options = handler.merged
    if not isinstance(exc, options.autoretry_for) or isinstance(exc, options.dont_autoretry_for):
        return
    if options.get("retry_backoff"):
        countdown = get_exponential_backoff_interval(
            factor=int(max(1.0, float(options.get("retry_backoff")))),
            retries=task.request.retries,
            maximum=int(options.get("retry_backoff_max")),
            full_jitter=bool(options.get("retry_jitter")),
        )
    else:
        countdown = task.default_retry_delay
    raise task.retry(exc=exc, countdown=countdown)


class DecodedCall:
    """A handler call read back from a message, ready to run."""

    def __init__(
        self, handler: Handler, signal: Signal, decoder: Decoder, sender: Any, kwargs: Any
    ):
        self.handler = handler
        self.signal = signal
        self.decoder = decoder
        self.sender = sender
        self.kwargs = kwargs

    def run(self) -> bool:
        """Fetch the instances, call the handler; False when a missing row skipped the call."""
        if not self._resolve_instances():
            return False
        func = self.handler.func
        if iscoroutinefunction(func):  # an async receiver: awaited, as Django's asend would
            func = async_to_sync(func)
        func(signal=self.signal, sender=resolve(self.sender), **resolve(self.kwargs))
        return True

    def _resolve_instances(self) -> bool:
        for ref in self.decoder.instances:
            if not ref.fresh or ref.pk is None:
                ref.resolved = snapshot_instance(ref)
                continue
            try:
                ref.resolved = ref.model._base_manager.db_manager(ref.db).get(pk=ref.pk)
            except ObjectDoesNotExist:
                policy = self.handler.merged.get("on_missing")
                if policy == "raise":
                    raise
                if policy == "snapshot" and ref.fields is not None:
                    ref.resolved = snapshot_instance(ref)
                    continue
                logger.warning(
                    "Skipped deferred handler %s: %s with pk=%r no longer exists in database "
                    "%r (on_missing=%r).",
                    self.handler.name,
                    ref.model._meta.label,
                    ref.pk,
                    ref.db,
                    policy,
                )
                return False
        return True


def decode_call(handler: Handler, body: Any) -> DecodedCall:
    """Check a message's shape and decode it; anything unexpected is a malformed message."""
    if type(body) is not dict or body.keys() - OPTIONAL_KEYS != MESSAGE_KEYS:
        keys = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise MalformedMessageError(f"unexpected message fields {keys}")
    if body["v"] != MESSAGE_VERSION:
        raise MalformedMessageError(f"unsupported message version {body['v']!r}")
    index, kwargs = body["signal"], body["kwargs"]
    if type(index) is not int or not 0 <= index < len(handler.signals):
        raise MalformedMessageError(f"signal index {index!r} is not one of the handler's signals")
    if type(kwargs) is not dict:
        raise MalformedMessageError("kwargs must be an object")
    for key in kwargs:
        if not key.isidentifier() or key in ("signal", "sender"):
            raise MalformedMessageError(f"invalid argument name {key!r}")
    decoder = Decoder()
    sender = decoder.decode(body["sender"])
    decoded = {key: decoder.decode(value) for key, value in kwargs.items()}
    return DecodedCall(handler, handler.signals[index], decoder, sender, decoded)
