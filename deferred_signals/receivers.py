"""The public API: the ``receiver`` decorator and the ``connect`` function."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar, overload

from celery import Task
from celery.local import Proxy
from django.db.models.signals import post_init, pre_init
from django.dispatch import Signal
from django.dispatch import receiver as django_receiver
from django.dispatch.dispatcher import _make_id  # type: ignore[attr-defined]
from django.utils.inspect import func_accepts_kwargs

from . import registry
from .exceptions import DeferredSignalConfigError, DeferredSignalError
from .proxy import make_proxy
from .registry import Handler
from .schema import OPTIONS, option_problems
from .tasks import create_task

F = TypeVar("F", bound=Callable[..., Any])
Signals = Signal | list[Signal] | tuple[Signal, ...]

#: Options of ``defer=True`` that are about the handler, not its Celery task.
HANDLER_KWARGS = ("name", "include_raw", "using", "aliases")


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
    aliases: list[str] | tuple[str, ...] = ...,
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
    _check_defer(defer, None)
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
    aliases: list[str] | tuple[str, ...] = (),
    **options: Any,
) -> None:
    """Connect ``receiver`` to ``signal``; with ``defer=True``, as a deferred handler.

    Without ``defer=True`` this is ``signal.connect(receiver, sender, weak, dispatch_uid)``.

    With ``defer=True``: ``name`` is the handler's (and its task's) name, by default
    ``module.qualname``; ``include_raw`` defers fixture loads (``raw=True``) too; ``using``
    names the database whose commit releases the call (default: the signal's ``using``, else
    its ``instance``'s database, else the default one); ``aliases`` are former names the handler
    still answers to, so messages queued under an old name run it after a rename. Any other
    keyword is a handler option, as in ``settings.DEFERRED_SIGNALS`` (``queue``,
    ``max_retries``, ``instance="snapshot"``...).
    The connection is always strong: ``weak`` is accepted and ignored.
    """
    _check_defer(defer, receiver)
    signals: list[Signal] = list(signal) if isinstance(signal, (list, tuple)) else [signal]
    # ``apps`` is ModelSignal.connect's, for lazy "app_label.Model" senders.
    extra = {"apps": options.pop("apps")} if "apps" in options else {}
    if not defer:
        _refuse_deferred_options(
            {"name": name, "include_raw": include_raw, "using": using, "aliases": aliases or None}
        )
        _refuse_deferred_options(options)
        for one in signals:
            one.connect(receiver, sender, weak, dispatch_uid, **extra, **options)
        return
    handler = _register(receiver, signals, name, include_raw, using, aliases, options)
    for one in signals:
        # Django computes this key for ``receiver`` itself, so ``signal.disconnect(receiver,
        # sender=...)`` disconnects the proxy, and connecting twice connects once.
        uid = dispatch_uid or _make_id(receiver)
        if not any(s is one and o is sender and u == uid for s, o, u in handler.connections):
            handler.connections.append((one, sender, uid))
        one.connect(make_proxy(handler, one), sender=sender, weak=False, dispatch_uid=uid, **extra)


def _check_defer(defer: object, func: object) -> None:
    # Any truthy value would defer: defer="false" too.
    if not isinstance(defer, bool):
        of = f" for {_describe(func)}" if func is not None else ""
        raise DeferredSignalConfigError(
            f"receiver()/connect() got defer={defer!r}{of}: defer must be True or False, "
            f"not a {type(defer).__name__}."
        )


def _describe(func: object) -> str:
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(func)


def _name_problem(what: str, value: object, where: str) -> str | None:
    """What is wrong with a handler name or alias (``what``: "name=", "the alias "), if
    anything: both name Celery tasks and are stored in the outbox and dead-letter tables'
    ``handler`` column, which a longer name would not fit when the call is written."""
    if not isinstance(value, str) or not value.strip():
        return f"{where} has {what}{value!r}: give a non-empty str, such as 'shop.on_paid'."
    if len(value) > registry.NAME_LENGTH:
        return (
            f"{where} has {what}{value[:40]!r}... ({len(value)} characters): the outbox and "
            f"dead-letter tables keep names of at most {registry.NAME_LENGTH}. Shorten it."
        )
    return None


def _unbound_self(func: Callable[..., Any]) -> str | None:
    """``self`` or ``cls`` when ``func`` is a plain function of a class body taking it first."""
    if not inspect.isfunction(func) or "." not in func.__qualname__:
        return None
    try:
        first = next(iter(inspect.signature(func).parameters.values()), None)
    except (TypeError, ValueError):
        return None
    if (
        first is not None
        and first.name in ("self", "cls")
        and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)
        and first.default is first.empty
    ):
        return first.name
    return None


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
    aliases: Iterable[Any],
    options: dict[str, Any],
) -> Handler:
    # Every problem of the call at once: fixing them one import at a time is tedious.
    problems: list[str] = []
    qualname = getattr(func, "__qualname__", "")
    given = name
    if name is not None and not isinstance(name, str):
        name = None  # reported below; ``where`` needs a str
    if given is None and callable(func):
        if not qualname or "<" in qualname or not hasattr(func, "__module__"):
            kind = (
                "a lambda or a function defined inside another"
                if qualname
                else "a functools.partial or a callable object has no __qualname__"
            )
            problems.append(
                f"{func!r} has no importable name ({kind}): define it at module level, "
                "or pass name='...'."
            )
        else:
            name = f"{func.__module__}.{qualname}"
    fits = name and len(name) <= registry.NAME_LENGTH
    where = f"Deferred handler {(name if fits else qualname or func)!r}"
    if given is not None:
        problems += filter(None, [_name_problem("name=", given, where)])
    elif name is not None:  # module.qualname, which may be too long
        problems += filter(None, [_name_problem("the name ", name, where)])
    if not isinstance(include_raw, bool):
        problems.append(f"{where} has include_raw={include_raw!r}: give True or False.")
    if not callable(func):
        problems.append(f"{where} must be callable, not {type(func).__name__}.")
    elif issubclass(type(func), (Task, Proxy)):  # the type: a Proxy is not evaluated
        # Its own task would take the task's name, which Celery keeps for the first one.
        problems.append(
            f"{where} is a Celery task (@shared_task or @app.task under @receiver): "
            "defer=True makes a task of the plain function itself. Remove the task decorator."
        )
    elif not func_accepts_kwargs(func):
        # Django checks this only with DEBUG; here it would fail later, on the worker.
        problems.append(f"{where} must accept keyword arguments: add **kwargs.")
    elif first := _unbound_self(func):
        problems.append(
            f"{where} takes {first!r} first, as a method decorated in its class body does: "
            f"the decorator connects the plain function, and nothing passes {first}. Connect "
            f"the method of an object instead, connect(signal, obj.{func.__name__}, "
            "defer=True), or make it a module-level function or a staticmethod (@staticmethod "
            "above @receiver)."
        )
    problems += [
        f"{problem.msg} {problem.hint}"
        for problem in option_problems(options, where, also_known=HANDLER_KWARGS)
    ]
    if using is not None and not isinstance(using, str):
        problems.append(f"{where} has using={using!r}: give a database alias.")
    # A str would be one alias per character.
    if isinstance(aliases, str) or not isinstance(aliases, Iterable):
        fix = f", aliases=[{aliases!r}]" if isinstance(aliases, str) else ""
        problems.append(f"{where} has aliases={aliases!r}: give a list of former names{fix}.")
        aliases = ()
    aliases = tuple(aliases)
    for alias in aliases:
        if alias == name:
            problems.append(
                f"{where} has the alias {alias!r}: aliases are the handler's former names."
            )
        else:
            problems += filter(None, [_name_problem("the alias ", alias, where)])
    problems += [
        f"{where} is connected to {signal!r}, which is not a django.dispatch.Signal."
        for signal in signals
        if not isinstance(signal, Signal)
    ]
    problems += [
        f"{where} is connected to {name}, which Django sends each time a model instance is "
        "made in memory (every row a query loads, the worker's own fetch of the instance "
        "included): deferred, it would publish a call per row loaded, and each call would "
        "send it again on the worker, without end. Connect it without defer=True."
        for name, signal in (("pre_init", pre_init), ("post_init", post_init))
        if any(one is signal for one in signals)
    ]
    if len(problems) == 1:
        raise DeferredSignalConfigError(problems[0])
    if problems:
        raise DeferredSignalConfigError(
            f"{where} cannot be registered ({len(problems)} problems):\n"
            + "\n".join(f"- {problem}" for problem in problems)
        )
    assert name is not None
    handler = registry.register(
        Handler(
            name=name,
            func=func,
            options=options,
            include_raw=include_raw,
            using=using,
            aliases=aliases,
        )
    )
    if handler.task is None:
        handler.task = create_task(handler)
    return handler
