"""The public API: the ``receiver`` decorator and the ``connect`` function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

from django.dispatch import Signal
from django.dispatch import receiver as django_receiver
from django.dispatch.dispatcher import _make_id  # type: ignore[attr-defined]
from django.utils.inspect import func_accepts_kwargs

from . import registry
from .conf import OPTIONS, option_problems
from .exceptions import DeferredSignalConfigError, DeferredSignalError
from .proxy import make_proxy
from .registry import Handler
from .tasks import create_task

F = TypeVar("F", bound=Callable[..., Any])
Signals = Signal | list[Signal] | tuple[Signal, ...]

#: Options of ``defer=True`` that are about the handler, not its Celery task.
HANDLER_KWARGS = ("name", "include_raw", "using")


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
        one.connect(make_proxy(handler, one), sender=sender, weak=False, dispatch_uid=uid, **extra)


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
