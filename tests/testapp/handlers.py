"""Test handlers, connected at start-up like a project's own (``TestAppConfig.ready``).

Deferred handlers write a ``Record`` row describing exactly what they received, wherever
they run; their synchronous twins append the same description to ``SYNC``, so a test can
compare what a deferred handler saw with what a synchronous one saw.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import models
from django.db.models.fields.files import FieldFile
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete
from django.dispatch import Signal

from deferred_signals import receiver, register_codec

from . import signals
from .models import Article, Attempt, Record, Ticket

SYNC: list[dict[str, Any]] = []

_SIGNAL_NAMES = {
    post_save: "post_save",
    post_delete: "post_delete",
    pre_delete: "pre_delete",
    m2m_changed: "m2m_changed",
    signals.user_registered: "user_registered",
    signals.user_invited: "user_invited",
    signals.flaky_signal: "flaky_signal",
    signals.slow_signal: "slow_signal",
    signals.renamed_signal: "renamed_signal",
    signals.row_touched: "row_touched",
}


@dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str


register_codec(
    Money,
    name="tests.money",
    encode=lambda money: [money.amount, money.currency],
    decode=lambda data: Money(*data),
)


class Plain:
    """A non-model class used as a signal sender."""


class FlakyError(Exception):
    pass


def describe(value: Any) -> Any:
    """A JSON description of a value and of its Python type, recursively."""
    if isinstance(value, models.Model):
        deferred = value.get_deferred_fields()
        return {
            "type": f"instance:{value._meta.label}",
            "pk": describe(value.pk),
            "adding": value._state.adding,
            "db": value._state.db,
            "fields": {
                f.attname: describe(getattr(value, f.attname))
                for f in value._meta.concrete_fields
                if f.attname not in deferred
            },
        }
    if isinstance(value, Signal):
        return {"type": "Signal", "name": _SIGNAL_NAMES.get(value, repr(value))}
    if isinstance(value, type):
        return {"type": "class", "name": f"{value.__module__}.{value.__qualname__}"}
    if isinstance(value, (set, frozenset)):
        return {"type": type(value).__name__, "items": sorted(map(repr, map(describe, value)))}
    if isinstance(value, (list, tuple)):
        return {"type": type(value).__name__, "items": [describe(item) for item in value]}
    if isinstance(value, dict):
        return {"type": "dict", "items": [[describe(k), describe(v)] for k, v in value.items()]}
    if isinstance(value, FieldFile):
        return {"type": "FieldFile", "name": value.name}
    if isinstance(value, (datetime.datetime, datetime.time)):
        return {
            "type": type(value).__name__,
            "iso": value.isoformat(),
            "aware": value.utcoffset() is not None,
        }
    return {"type": type(value).__name__, "repr": repr(value)}


def describe_call(signal: Signal, sender: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "signal": describe(signal),
        "sender": describe(sender),
        "kwargs": {name: describe(value) for name, value in sorted(kwargs.items())},
    }


def record(handler: str, signal: Signal, sender: Any, kwargs: dict[str, Any]) -> None:
    Record.objects.create(
        handler=handler,
        call=describe_call(signal, sender, kwargs),
        pid=os.getpid(),
        ran_at=time.time(),
    )


def sync(handler: str, signal: Signal, sender: Any, kwargs: dict[str, Any]) -> None:
    SYNC.append({"handler": handler, "call": describe_call(signal, sender, kwargs)})


# --- model signals -------------------------------------------------------------------------


@receiver(post_save, sender=Article, defer=True)
def article_saved(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("article_saved", signal, sender, kwargs)


@receiver(post_save, sender=Article)
def article_saved_sync(signal: Signal, sender: Any, **kwargs: Any) -> None:
    sync("article_saved", signal, sender, kwargs)


@receiver(post_save, sender=Article, defer=True, instance="snapshot")
def article_snapshot(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("article_snapshot", signal, sender, kwargs)


@receiver([pre_delete, post_delete], sender=Article, defer=True)
def article_deleted(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("article_deleted", signal, sender, kwargs)


@receiver([pre_delete, post_delete], sender=Article)
def article_deleted_sync(signal: Signal, sender: Any, **kwargs: Any) -> None:
    # What a synchronous handler sees when it runs at send time (pk still set).
    sync("article_deleted", signal, sender, kwargs)


@receiver(m2m_changed, sender=Article.tags.through, defer=True)
def tags_changed(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("tags_changed", signal, sender, kwargs)


@receiver(m2m_changed, sender=Article.tags.through)
def tags_changed_sync(signal: Signal, sender: Any, **kwargs: Any) -> None:
    sync("tags_changed", signal, sender, kwargs)


@receiver(post_save, sender=Ticket, defer=True, on_missing="snapshot", include_raw=True)
def ticket_saved(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("ticket_saved", signal, sender, kwargs)


# --- custom signals ------------------------------------------------------------------------


@receiver([signals.user_registered, signals.user_invited], defer=True, name="tests.user_event")
def user_event(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("user_event", signal, sender, kwargs)


@receiver([signals.user_registered, signals.user_invited])
def user_event_sync(signal: Signal, sender: Any, **kwargs: Any) -> None:
    sync("user_event", signal, sender, kwargs)


@receiver(signals.flaky_signal, defer=True)
def flaky(signal: Signal, sender: Any, key: str, fail_times: int, **kwargs: Any) -> None:
    """Fails ``fail_times`` times, then records; retries come from settings.DEFERRED_SIGNALS."""
    attempt, _ = Attempt.objects.get_or_create(key=key)
    Attempt.objects.filter(pk=attempt.pk).update(count=models.F("count") + 1)
    attempt.refresh_from_db()
    if attempt.count <= fail_times:
        raise FlakyError(f"attempt {attempt.count} of {key}")
    record("flaky", signal, sender, {"key": key, "attempts": attempt.count})


@receiver(signals.slow_signal, defer=True)
def marker(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("marker", signal, sender, kwargs)


# A handler renamed from ``old_name``: messages queued under the old name still reach it.
@receiver(signals.renamed_signal, defer=True, aliases=["tests.testapp.handlers.old_name"])
def renamed(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("renamed", signal, sender, kwargs)


# A coalescing handler: one call per row and transaction; snapshots show the arguments.
@receiver(signals.row_touched, defer=True, coalesce=True, instance="snapshot")
def row_touched(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("row_touched", signal, sender, kwargs)
