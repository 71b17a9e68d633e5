"""The registry of deferred handlers: the only place a worker finds code to run."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.dispatch import Signal

from .conf import HandlerOptions, conf
from .exceptions import DuplicateHandlerError


@dataclass(eq=False)
class Handler:
    """A function registered with ``receiver(..., defer=True)`` or ``connect(..., defer=True)``."""

    name: str
    func: Callable[..., Any]
    #: Options given in code (decorator or ``connect``), the middle layer of the merge.
    options: Mapping[str, Any]
    include_raw: bool = False
    using: str | None = None
    #: Former names: each gets a task of its own, so messages queued under it still run.
    aliases: tuple[str, ...] = ()
    #: Every signal the handler is connected to; a message names one by its index here.
    signals: list[Signal] = field(default_factory=list)
    #: (signal, sender, dispatch uid) of each connection, for ``manage.py deferred_handlers``.
    connections: list[tuple[Signal, Any, Any]] = field(default_factory=list)
    #: The Celery task (a ``shared_task`` proxy), set by ``tasks.create_task``.
    task: Any = None

    @cached_property
    def is_async(self) -> bool:
        """An ``async def`` receiver (the worker runs it with ``async_to_sync``)."""
        return iscoroutinefunction(self.func)

    @property
    def merged(self) -> HandlerOptions:
        return conf.options(self.name, self.options)

    def signal_index(self, signal: Signal) -> int:
        for index, known in enumerate(self.signals):
            if known is signal:
                return index
        self.signals.append(signal)
        return len(self.signals) - 1

    def __repr__(self) -> str:
        return f"<deferred handler {self.name}>"


#: The longest handler name (or alias): what the ``handler`` column of the outbox and
#: dead-letter tables holds (``models.py`` sizes them with it).
NAME_LENGTH = 255

_handlers: dict[str, Handler] = {}
#: alias -> registered name
_aliases: dict[str, str] = {}


def register(handler: Handler) -> Handler:
    """Add ``handler``, or return the one already registered for the same function.

    Connecting one function several times (to several senders, or signals) is normal Django
    practice and shares one handler and one task; two functions under one name are an error.
    """
    existing = _handlers.get(handler.name)
    if existing is None:
        _check_names(handler)
        _handlers[handler.name] = handler
        _aliases.update(dict.fromkeys(handler.aliases, handler.name))
        conf.forget(handler.name)
        return handler
    # ``==``, not ``is``: each read of ``obj.method`` makes a new bound-method object, and
    # Django too takes two of them for one receiver (same function, same instance).
    if existing.func != handler.func:
        raise DuplicateHandlerError(
            f"Two deferred handlers are named {handler.name!r}: "
            f"{_describe(existing.func)} and {_describe(handler.func)}. "
            "Give one of them another name with receiver(..., defer=True, name='...')."
        )
    if (existing.options, existing.include_raw, existing.using, existing.aliases) != (
        handler.options,
        handler.include_raw,
        handler.using,
        handler.aliases,
    ):
        raise DuplicateHandlerError(
            f"Deferred handler {handler.name!r} is connected twice with different options "
            f"({_settings(existing)} and {_settings(handler)}). Connect it once with "
            "a list of signals, or set per-handler options in settings.DEFERRED_SIGNALS."
        )
    return existing


def _check_names(handler: Handler) -> None:
    """A name or alias serves one handler only: a worker could not tell which one to run."""
    if handler.name in _aliases:
        raise DuplicateHandlerError(
            f"Deferred handler {handler.name!r} takes the name that deferred handler "
            f"{_aliases[handler.name]!r} keeps as an alias. Rename one of them."
        )
    for alias in handler.aliases:
        owner = alias if alias in _handlers else _aliases.get(alias)
        if owner is not None:
            raise DuplicateHandlerError(
                f"Deferred handler {handler.name!r} has the alias {alias!r}, which deferred "
                f"handler {owner!r} already answers to. Remove the alias from one of them."
            )


def _settings(handler: Handler) -> str:
    extra = {"include_raw": handler.include_raw, "using": handler.using, "aliases": handler.aliases}
    return str({**handler.options, **{k: v for k, v in extra.items() if v}})


def get(name: str) -> Handler | None:
    """The handler registered as ``name``, or answering to it as an alias (a renamed one)."""
    handler = _handlers.get(name)
    if handler is None and name in _aliases:
        return _handlers.get(_aliases[name])
    return handler


def unregister(name: str) -> None:
    """Forget a handler (tests); its proxies must be disconnected by the caller."""
    handler = _handlers.pop(name, None)
    for alias in handler.aliases if handler is not None else ():
        _aliases.pop(alias, None)
    conf.forget(name)


def all_handlers() -> Iterator[Handler]:
    return iter(list(_handlers.values()))


def _describe(func: Callable[..., Any]) -> str:
    code = getattr(func, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)!s}{where}"
