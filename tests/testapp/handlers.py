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

from django.db import OperationalError, models
from django.db.models.fields.files import FieldFile
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete
from django.dispatch import Signal

from deferred_signals import current_call, receiver, register_codec

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
    signals.killable_signal: "killable_signal",
    signals.counted_signal: "counted_signal",
    signals.db_flaky_signal: "db_flaky_signal",
    signals.row_touched: "row_touched",
    signals.overrun_signal: "overrun_signal",
    signals.soft_overrun_signal: "soft_overrun_signal",
    signals.lossy_signal: "lossy_signal",
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


# A class travels as a value (here: a sender) only once a codec vouches for it.
register_codec(Plain, name="tests.plain", encode=lambda plain: None, decode=lambda data: Plain())


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
    call = current_call()
    record(
        "flaky", signal, sender, {"key": key, "attempts": attempt.count, "call": call and call.id}
    )


@receiver(signals.slow_signal, defer=True)
def marker(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("marker", signal, sender, kwargs)


# A handler renamed from ``old_name``: messages queued under the old name still reach it.
@receiver(signals.renamed_signal, defer=True, aliases=["tests.testapp.handlers.old_name"])
def renamed(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("renamed", signal, sender, kwargs)


# --- the worker's faults (tests/test_worker_faults.py) ---------------------------------------


def call_info() -> dict[str, Any]:
    call = current_call()
    assert call is not None
    return {"id": call.id, "attempt": call.attempt, "handler": call.handler}


@receiver(signals.killable_signal, defer=True)
def killable(signal: Signal, sender: Any, key: str, seconds: float, **kwargs: Any) -> None:
    """Says which process runs it, then takes ``seconds``: a test kills it in between."""
    Record.objects.create(
        handler="killable_start",
        call={"key": key, **call_info()},
        pid=os.getpid(),
        ran_at=time.time(),
    )
    time.sleep(seconds)
    Record.objects.create(
        handler="killable_done",
        call={"key": key, **call_info()},
        pid=os.getpid(),
        ran_at=time.time(),
    )


@receiver(signals.counted_signal, defer=True, idempotent=True)
def counted(signal: Signal, sender: Any, key: str, **kwargs: Any) -> None:
    """Its database writes happen once per call, however often the call is delivered."""
    attempt, _ = Attempt.objects.get_or_create(key=key)
    Attempt.objects.filter(pk=attempt.pk).update(count=models.F("count") + 1)


@receiver(signals.db_flaky_signal, defer=True)
def db_flaky(
    signal: Signal, sender: Any, key: str, outages: int, failures: int, **kwargs: Any
) -> None:
    """Meets ``outages`` database errors, then ``failures`` FlakyErrors, then records."""
    attempt, _ = Attempt.objects.get_or_create(key=key)
    Attempt.objects.filter(pk=attempt.pk).update(count=models.F("count") + 1)
    attempt.refresh_from_db()
    if attempt.count <= outages:
        raise OperationalError(f"outage {attempt.count} of {key}")
    if attempt.count <= outages + failures:
        raise FlakyError(f"attempt {attempt.count} of {key}")
    record("db_flaky", signal, sender, {"key": key, "call": call_info()})


# A coalescing handler: one call per row and transaction; snapshots show the arguments.
@receiver(signals.row_touched, defer=True, coalesce=True, instance="snapshot")
def row_touched(signal: Signal, sender: Any, **kwargs: Any) -> None:
    record("row_touched", signal, sender, kwargs)


# --- time limits and lost children, without redelivery (tests/test_worker_lost.py) ----------


def first_run(name: str, key: str) -> bool:
    """Counts this run of ``name`` for ``key``; True for the first one."""
    attempt, _ = Attempt.objects.get_or_create(key=f"{name}-{key}")
    Attempt.objects.filter(pk=attempt.pk).update(count=models.F("count") + 1)
    return attempt.count == 0


def mark(handler: str, key: str) -> None:
    Record.objects.create(
        handler=handler, call={"key": key, **call_info()}, pid=os.getpid(), ran_at=time.time()
    )


@receiver(signals.overrun_signal, defer=True, time_limit=2)
def overrun(signal: Signal, sender: Any, key: str, seconds: float, **kwargs: Any) -> None:
    """Sleeps ``seconds`` on its first run only: past its hard time limit, the pool kills it."""
    if first_run("overrun", key):
        time.sleep(seconds)
    mark("overrun", key)


@receiver(signals.soft_overrun_signal, defer=True, soft_time_limit=1, time_limit=30)
def soft_overrun(signal: Signal, sender: Any, key: str, seconds: float, **kwargs: Any) -> None:
    """Sleeps ``seconds`` on its first run only: its soft time limit raises in the sleep."""
    if first_run("soft_overrun", key):
        time.sleep(seconds)
    mark("soft_overrun", key)


def lossy(name: str, key: str, seconds: float) -> None:
    """Says which process runs it, then takes ``seconds`` on its first run: a test kills it."""
    first = first_run(name, key)
    mark(f"{name}_start", key)
    if first:
        time.sleep(seconds)
    mark(name, key)


# Acknowledged before it runs (at most once): a killed child is not redelivered.
@receiver(signals.lossy_signal, defer=True, acks_late=False)
def lossy_acked_early(signal: Signal, sender: Any, key: str, seconds: float, **kwargs: Any) -> None:
    lossy("lossy_acked_early", key, seconds)


# Acknowledged after it runs, but a lost child's message is acknowledged too, not requeued.
@receiver(signals.lossy_signal, defer=True, reject_on_worker_lost=False)
def lossy_not_requeued(
    signal: Signal, sender: Any, key: str, seconds: float, **kwargs: Any
) -> None:
    lossy("lossy_not_requeued", key, seconds)
