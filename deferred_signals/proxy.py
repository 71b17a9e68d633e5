"""The proxy receiver: what runs in the request when a signal reaches a deferred handler.

It encodes the call (once per ``send()``, however many deferred handlers receive it), keeps
the encoding frozen (:mod:`frozen`: compact and shared until the commit) and hands the call
to :mod:`dispatch`, which attaches it to the transaction of the right database. A call
the worker could not run is refused here, in the request (:mod:`send_errors`).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Model
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import Signal

from . import coalesce, dispatch, frozen, readiness, send_errors, signals
from .calls import DeferredCall, current_call, running_body
from .codec import EncodeError, Encoder, TooDeepError
from .exceptions import DeferredSignalConfigError
from .frozen import Frozen, freeze, thaw
from .ids import uuid4
from .registry import Handler

DELETE_SIGNALS = (pre_delete, post_delete)

logger = logging.getLogger("deferred_signals")

_serials = itertools.count()
_newest_serial = -1

#: The package's own models (outbox rows, dead letters, heartbeats, processed call ids),
#: filled when the app is ready. A deferred handler never hears of their saves: a catch-all
#: ``post_save`` handler would feed on its own dead letters, in a loop.
OWN_MODELS: set[type[Model]] = set()


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
    encoded: dict[tuple[bool, bool, bool], tuple[Frozen, Frozen]]


_last_send = _LastSend()


def make_proxy(handler: Handler, signal: Signal) -> Callable[..., None]:
    global _newest_serial
    index = handler.signal_index(signal)
    serial = _newest_serial = next(_serials)
    deletes = signal in DELETE_SIGNALS
    #: Argument names the handler was found to accept: checked once per set of names.
    accepted: set[frozenset[str]] = set()

    def proxy(signal: Signal, sender: Any, **kwargs: Any) -> None:
        if kwargs.get("raw") and not handler.include_raw:
            return
        try:
            if sender in OWN_MODELS:
                return
        except TypeError:  # an unhashable sender: none of ours
            pass
        readiness.check()
        names = frozenset(kwargs)
        if names not in accepted:
            send_errors.check_signature(handler, names)
            accepted.add(names)
        options = handler.merged
        if options.conflict is not None:
            raise DeferredSignalConfigError(options.conflict)
        fresh = options.fresh and not deletes
        sender_data, kwargs_data = _encode(
            handler, serial, signal, sender, kwargs, fresh, options.snapshot_fallback, deletes
        )
        running = current_call()
        if running is not None and running.handler == handler.name:
            # If it is the call it serves again: same row, same arguments.
            _warn_self_call(handler, running, kwargs.get("instance"), index, kwargs_data)
        key = _coalesce_key(index, sender, kwargs.get("instance")) if options.coalesce else None
        call = dispatch.PendingCall(
            handler,
            # A coalesced call takes its group's id (the one published), or a new one.
            uuid4() if key is None else "",
            None,
            options.outbox,
            signal=index,
            sender=sender_data,
            kwargs=kwargs_data,
        )
        using = _alias(handler, kwargs, call)
        # Sent once the call has its id, before it can be published (outside a transaction
        # it is published, or run with EAGER, at once). The request path: not even the call,
        # unused.
        announce = _Announce(handler, call, using) if signals.call_deferred.receivers else None
        if key is None:
            if announce is not None:
                announce()
            dispatch.enqueue(call, using)
        else:
            coalesce.enqueue(call, using, key, announce)

    # send_robust() reports errors against the receiver: let it read as the user's function.
    func = handler.func
    proxy.__name__ = getattr(func, "__name__", handler.name)
    proxy.__qualname__ = getattr(func, "__qualname__", proxy.__name__)
    proxy.__module__ = getattr(func, "__module__", __name__)
    proxy.__doc__ = getattr(func, "__doc__", None)
    proxy.__wrapped__ = func  # type: ignore[attr-defined]
    return proxy


def _warn_self_call(
    handler: Handler, running: DeferredCall, instance: Any, index: int, kwargs_data: Frozen
) -> None:
    # A synchronous handler saving its own row recurses until RecursionError; deferred, each
    # run publishes the next, quietly and without end. Said, not refused: a handler that
    # stops itself (a state that moves on) is fine.
    if not _serves_again(running_body(), index, kwargs_data):
        # Another row of the model (a parent's counter), or the guarded save the warning
        # advises (a run for update_fields=["title"] returns at once): chains that end. A
        # loop defers, from its second run on, the very call it serves.
        return
    row = f" for {_row(instance)}" if isinstance(instance, Model) else ""
    logger.warning(
        "Deferred handler %s, running for call %s, deferred a call to itself%s: a handler "
        "that saves the row its signal is about sends that signal again, and so on without "
        "end unless it stops itself (look at update_fields or created, or save with "
        "QuerySet.update(), which sends no signal).",
        handler.name,
        running.id,
        row,
    )


def _serves_again(body: dict[str, Any] | None, index: int, kwargs_data: Frozen) -> bool:
    """Does the new call carry what the running call's message carries: the same signal, the
    same arguments and the same row (its model and pk; its fields may have changed), as both
    messages encode them?"""
    if not isinstance(body, dict) or body.get("signal") != index:
        return False
    running, new = body.get("kwargs"), thaw(kwargs_data)
    if not isinstance(running, dict) or not isinstance(new, dict):
        return False
    return _by_row(running) == _by_row(new)


def _by_row(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Encoded arguments with ``instance`` as its row: a model's label and encoded pk, or
    None for anything that is not a model instance."""
    instance = kwargs.get("instance")
    row = (instance.get("m"), instance.get("pk")) if isinstance(instance, dict) else None
    return {**kwargs, "instance": row if row is None or row[0] is not None else None}


def _row(instance: Model) -> str:
    return f"<{instance._meta.label_lower} pk={instance.pk!r}>"


class _Announce:
    """Sends ``call_deferred`` for one call (coalescing calls it once the call has its id)."""

    __slots__ = ("call", "handler", "using")

    def __init__(self, handler: Handler, call: dispatch.PendingCall, using: str) -> None:
        self.handler, self.call, self.using = handler, call, using

    def __call__(self) -> None:
        call = self.call
        signals.call_deferred.send(
            self.handler.func,
            handler=self.handler.name,
            call_id=call.id,
            using=self.using,
            delivery="outbox" if call.outbox else "on_commit",
        )


def _coalesce_key(index: int, sender: Any, instance: Any) -> coalesce.Key | None:
    """What makes two calls one under ``coalesce=True``: signal, sender and saved row."""
    if not isinstance(instance, Model) or instance.pk is None:
        return None  # no row to coalesce on
    try:
        hash(sender)
    except TypeError:
        return None
    return (index, sender, instance._meta.label, instance.pk, instance._state.db)


def _encode(
    handler: Handler,
    serial: int,
    signal: Signal,
    sender: Any,
    kwargs: dict[str, Any],
    fresh: bool,
    fields: bool,
    deleting: bool,
) -> tuple[Frozen, Frozen]:
    """The sender and the arguments, encoded and frozen: shared by the send's calls."""
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
                frozen.sender(encoder, sender),
                freeze({name: encoder.encode(value) for name, value in kwargs.items()}),
            )
        except TooDeepError:
            raise send_errors.too_deep_error(
                handler, encoder, {"sender": sender, **kwargs}
            ) from None
        except EncodeError as error:
            raise send_errors.encode_error(
                handler, error, {"sender": sender, **kwargs}
            ) from error.__cause__
        last.encoded[variant] = encoded
    return encoded


def _alias(handler: Handler, kwargs: dict[str, Any], call: dispatch.PendingCall) -> str:
    """The database whose commit releases the call: ``using=``, else the signal's ``using``.

    A custom signal has no ``using``: the default database's transaction when one is open
    (an instance read from a replica must not release the call early), else the transaction
    open on its ``instance``'s database, else the default database. When both are open, the
    call waits for both commits (``call.after``): the row must be there for the worker.
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
        and transaction.get_connection(instance._state.db).in_atomic_block
    ):
        if not transaction.get_connection(DEFAULT_DB_ALIAS).in_atomic_block:
            return instance._state.db
        if dispatch.in_transaction(transaction.get_connection(instance._state.db)):
            call.after = instance._state.db
            dispatch.waiting = True
    return DEFAULT_DB_ALIAS
