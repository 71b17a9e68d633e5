"""The public ``receiver`` decorator and ``connect`` function, and the proxy they connect."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

from celery.utils import uuid
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Model
from django.db.models.query import QuerySet
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import Signal
from django.dispatch import receiver as django_receiver
from django.dispatch.dispatcher import _make_id  # type: ignore[attr-defined]
from django.utils.inspect import func_accepts_kwargs

from . import dispatch, registry
from .codec import EncodeError, Encoder, locate
from .conf import OPTIONS, option_problems
from .exceptions import DeferredSignalConfigError, DeferredSignalError
from .registry import Handler
from .tasks import MESSAGE_VERSION, create_task

F = TypeVar("F", bound=Callable[..., Any])
Signals = Signal | list[Signal] | tuple[Signal, ...]

#: Options of ``defer=True`` that are about the handler, not its Celery task.
HANDLER_KWARGS = ("name", "include_raw", "using")
DELETE_SIGNALS = (pre_delete, post_delete)


@overload
def receiver(
    signal: Signals,
    *,
    sender: Any = ...,
    weak: bool = ...,
    dispatch_uid: Any = ...,
    defer: Literal[False] = ...,
) -> Callable[[F], F]: ...


@overload
def receiver(
    signal: Signals,
    *,
    defer: Literal[True],
    sender: Any = ...,
    weak: bool = ...,
    dispatch_uid: Any = ...,
    name: str | None = ...,
    include_raw: bool = ...,
    using: str | None = ...,
    **options: Any,
) -> Callable[[F], F]: ...


@overload
def receiver(signal: Signals, *, defer: bool, **kwargs: Any) -> Callable[[F], F]: ...


def receiver(signal: Signals, *, defer: bool = False, **kwargs: Any) -> Callable[[F], F]:
    """Connect the decorated function to ``signal`` (a signal or a list of signals).

    Without ``defer=True`` this is :func:`django.dispatch.receiver`, unchanged. With
    ``defer=True`` the function runs as a Celery task on a worker, after the transaction
    that sent the signal commits (see :func:`connect` for the options). The function is
    returned unchanged either way and stays directly callable.
    """
    if not defer:
        _refuse_deferred_options(kwargs)
        return django_receiver(signal, **kwargs)

    def decorator(func: F) -> F:
        connect(signal, func, defer=True, **kwargs)
        return func

    return decorator


def connect(
    signal: Signals,
    receiver: Callable[..., Any],
    sender: Any = None,
    weak: bool = True,
    dispatch_uid: Any = None,
    *,
    defer: bool = False,
    name: str | None = None,
    include_raw: bool = False,
    using: str | None = None,
    **options: Any,
) -> None:
    """Connect ``receiver`` to ``signal``; with ``defer=True``, as a deferred handler.

    Without ``defer=True`` this is ``signal.connect(receiver, sender, weak, dispatch_uid)``.

    With ``defer=True``: ``name`` is the handler's (and its task's) name, by default
    ``module.qualname``; ``include_raw`` defers fixture loads (``raw=True``) too; ``using``
    names the database whose commit releases the call (default: the signal's ``using``, else
    its ``instance``'s database, else the default one). Any other keyword is a handler option, as in
    ``settings.DEFERRED_SIGNALS`` (``queue``, ``max_retries``, ``instance="snapshot"``...).
    The connection is always strong: ``weak`` is accepted and ignored.
    """
    signals: list[Signal] = list(signal) if isinstance(signal, (list, tuple)) else [signal]
    # ``apps`` is ModelSignal.connect's, for lazy "app_label.Model" senders.
    extra = {"apps": options.pop("apps")} if "apps" in options else {}
    if not defer:
        _refuse_deferred_options({"name": name, "include_raw": include_raw, "using": using})
        _refuse_deferred_options(options)
        for one in signals:
            one.connect(receiver, sender, weak, dispatch_uid, **extra, **options)
        return
    handler = _register(receiver, signals, name, include_raw, using, options)
    for one in signals:
        # Django computes this key for ``receiver`` itself, so ``signal.disconnect(receiver,
        # sender=...)`` disconnects the proxy, and connecting twice connects once.
        uid = dispatch_uid or _make_id(receiver)
        if not any(s is one and o is sender and u == uid for s, o, u in handler.connections):
            handler.connections.append((one, sender, uid))
        one.connect(_make_proxy(handler, one), sender=sender, weak=False, dispatch_uid=uid, **extra)


def _refuse_deferred_options(kwargs: dict[str, Any]) -> None:
    # Only our own options: anything else goes to Django, which accepts or refuses it itself
    # (``apps`` for lazy model senders, a typo...). Identity tests: a sender may define __eq__.
    extra = [
        key
        for key, value in kwargs.items()
        if (key in OPTIONS or key in HANDLER_KWARGS) and value is not None and value is not False
    ]
    if extra:
        raise DeferredSignalError(
            f"receiver()/connect() got {', '.join(map(repr, extra))}, which only apply to "
            "deferred handlers: add defer=True."
        )


def _register(
    func: Callable[..., Any],
    signals: list[Signal],
    name: str | None,
    include_raw: bool,
    using: str | None,
    options: dict[str, Any],
) -> Handler:
    if not callable(func):
        raise DeferredSignalConfigError(f"A deferred handler must be callable, not {func!r}.")
    if name is None:
        qualname = getattr(func, "__qualname__", "")
        if not qualname or "<" in qualname or not hasattr(func, "__module__"):
            raise DeferredSignalConfigError(
                f"{func!r} has no importable name (a lambda or a function defined inside "
                "another): define it at module level, or pass name='...'."
            )
        name = f"{func.__module__}.{qualname}"
    problems = option_problems(options, f"Deferred handler {name!r}: option")
    if problems:
        raise DeferredSignalConfigError(f"{problems[0].msg} {problems[0].hint}")
    if using is not None and not isinstance(using, str):
        raise DeferredSignalConfigError(f"Deferred handler {name!r}: using must be an alias.")
    if not func_accepts_kwargs(func):
        # Django checks this only with DEBUG; here it would fail later, on the worker.
        raise DeferredSignalConfigError(
            f"Deferred handler {name!r} must accept keyword arguments: add **kwargs."
        )
    for signal in signals:
        if not isinstance(signal, Signal):
            raise DeferredSignalConfigError(
                f"Deferred handler {name!r}: {signal!r} is not a django.dispatch.Signal."
            )
    handler = registry.register(
        Handler(name=name, func=func, options=options, include_raw=include_raw, using=using)
    )
    if handler.task is None:
        handler.task = create_task(handler)
    return handler


# --- the proxy receiver: runs in the request, inside the signal --------------------------

_serials = itertools.count()
_newest_serial = -1


class _LastSend(threading.local):
    """What the previous proxy encoded, so one send encodes its arguments once.

    Within one ``Signal.send()`` Django calls receivers in connection order, so proxy serials
    only grow; a serial that does not grow means a new send, even with the same objects. A
    proxy connected since the memo was taken may sit after it in a later send, so a new
    connection also ends the memo. The memo keeps the last send's arguments alive until the
    next deferred send in the same thread.
    """

    serial = -1
    newest = -1
    signal: Signal | None = None
    sender: Any = None
    kwargs: dict[str, Any] | None = None
    encoded: dict[tuple[bool, bool, bool], tuple[Any, Any]]


_last_send = _LastSend()


def _make_proxy(handler: Handler, signal: Signal) -> Callable[..., None]:
    global _newest_serial
    index = handler.signal_index(signal)
    serial = _newest_serial = next(_serials)
    deletes = signal in DELETE_SIGNALS

    def proxy(signal: Signal, sender: Any, **kwargs: Any) -> None:
        if kwargs.get("raw") and not handler.include_raw:
            return
        options = handler.merged
        fresh = options.get("instance") == "fresh" and not deletes
        fields = options.get("on_missing") == "snapshot"
        sender_data, kwargs_data = _encode(
            handler, serial, signal, sender, kwargs, fresh, fields, deletes
        )
        body = {"v": MESSAGE_VERSION, "signal": index, "sender": sender_data, "kwargs": kwargs_data}
        dispatch.enqueue(dispatch.PendingCall(handler, uuid(), body), _alias(handler, kwargs))

    proxy.__qualname__ = f"deferred({handler.name})"
    return proxy


def _encode(
    handler: Handler,
    serial: int,
    signal: Signal,
    sender: Any,
    kwargs: dict[str, Any],
    fresh: bool,
    fields: bool,
    deleting: bool,
) -> tuple[Any, Any]:
    last = _last_send
    previous = last.kwargs
    same_send = (
        serial > last.serial
        and last.newest == _newest_serial
        and signal is last.signal
        and sender is last.sender
        and previous is not None
        and kwargs.keys() == previous.keys()
        and all(value is previous[name] for name, value in kwargs.items())
    )
    if not same_send:
        last.signal, last.sender, last.kwargs, last.encoded = signal, sender, kwargs, {}
        last.newest = _newest_serial
    last.serial = serial
    variant = (fresh, fields, deleting)
    encoded = last.encoded.get(variant)
    if encoded is None:
        encoder = Encoder(fresh=fresh, fields=fields, deleting=deleting)
        try:
            encoded = (
                encoder.encode(sender),
                {name: encoder.encode(value) for name, value in kwargs.items()},
            )
        except EncodeError as error:
            raise _encode_error(handler, error, {"sender": sender, **kwargs}) from None
        last.encoded[variant] = encoded
    return encoded


def _encode_error(
    handler: Handler, error: EncodeError, arguments: dict[str, Any]
) -> DeferredSignalError:
    path = next(
        (found for name, value in arguments.items() if (found := locate(value, error.value, name))),
        # Not among the arguments: a registered codec's encode() returned it.
        "an argument (inside a registered codec's output)",
    )
    kind = type(error.value)
    # repr() of a QuerySet would run a query; of anything else, keep it short.
    if isinstance(error.value, QuerySet):
        shown = f"a QuerySet of {error.value.model._meta.label}"
    else:
        shown = f"{error.value!r:.80}"
    hint = error.hint or (
        "send a JSON-friendly value instead (for a model, the instance or its pk), or teach "
        f"deferred_signals the type: register_codec({kind.__qualname__}, name=..., "
        "encode=..., decode=...)"
    )
    return DeferredSignalError(
        f"Deferred handler {handler.name!r} cannot receive argument {path!r}: "
        f"{kind.__module__}.{kind.__qualname__} ({shown}) cannot be sent to a "
        f"worker. Fix: {hint}."
    )


def _alias(handler: Handler, kwargs: dict[str, Any]) -> str:
    """The database whose commit releases the call: ``using=``, else the signal's ``using``.

    A custom signal has no ``using``: the default database's transaction when one is open
    (an instance read from a replica must not release the call early), else the transaction
    open on its ``instance``'s database, else the default database.
    """
    if handler.using is not None:
        return handler.using
    using = kwargs.get("using")
    if isinstance(using, str) and using in connections.settings:
        return using
    instance = kwargs.get("instance")
    if (
        isinstance(instance, Model)
        and instance._state.db not in (None, DEFAULT_DB_ALIAS)
        and not transaction.get_connection(DEFAULT_DB_ALIAS).in_atomic_block
        and transaction.get_connection(instance._state.db).in_atomic_block
    ):
        return instance._state.db
    return DEFAULT_DB_ALIAS
