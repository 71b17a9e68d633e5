"""Receivers and tasks for every idiom the benchmark compares.

Nothing is connected at import time: each case connects the receivers of the idiom it
measures (see ``benchmarks.variants``) and disconnects them afterwards, so idioms never
add up. Every receiver ends in the same trivial work, :func:`touch`, so the figures compare
the machinery, not the work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import shared_task
from celery.contrib.django.task import DjangoTask
from django.db import transaction
from django.dispatch import Signal

from deferred_signals import register_codec

#: Sent 1,000 times in one transaction (case 2) with a model instance and a few kwargs.
order_placed = Signal()
#: Sent once per call to 1 or 10 deferred handlers (case 3).
fanout = Signal()


def touch(pk: Any, flag: Any = None) -> int:
    """The handlers' work: trivial on purpose."""
    return hash((pk, flag)) & 1


# --- Celery tasks of the hand-written idioms ----------------------------------------------
# Declared like a project would: shared_task, ignore_result (no result backend), and the
# DjangoTask base that provides delay_on_commit.


@shared_task(name="benchmarks.notify_saved", base=DjangoTask, ignore_result=True)
def notify_saved(pk: int, created: bool) -> None:
    touch(pk, created)


@shared_task(name="benchmarks.record_order", base=DjangoTask, ignore_result=True)
def record_order(pk: int, amount: Any, tags: list[str], placed_at: Any) -> None:
    touch(pk, amount)


# --- case 1: post_save on one row ---------------------------------------------------------


def saved_deferred(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    """Connected with ``deferred_signals.connect(..., defer=True)``: runs on a worker."""
    touch(instance.pk, created)


def saved_idiom(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    # The idiom found in most projects: a closure per call, one publish per callback.
    transaction.on_commit(lambda: notify_saved.delay(instance.pk, created))


def saved_delay_on_commit(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    notify_saved.delay_on_commit(instance.pk, created)


def saved_sync(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    touch(instance.pk, created)


def _numbered(kind: str, number: int) -> Callable[..., None]:
    """One of ten distinct post_save receivers of ``kind`` (case 3b: ten handlers)."""

    def deferred(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
        touch(instance.pk, number)

    def idiom(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
        transaction.on_commit(lambda: notify_saved.delay(instance.pk, created))

    def on_commit_task(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
        notify_saved.delay_on_commit(instance.pk, created)

    handler = {"deferred": deferred, "idiom": idiom, "delay_on_commit": on_commit_task}[kind]
    handler.__name__ = handler.__qualname__ = f"saved_{kind}_{number}"
    return handler


SAVED_TEN = {
    kind: [_numbered(kind, number) for number in range(10)]
    for kind in ("deferred", "idiom", "delay_on_commit")
}


# --- case 2: a custom signal, 1,000 times in one transaction ------------------------------


def order_deferred(sender: Any, instance: Any, amount: Any, **kwargs: Any) -> None:
    touch(instance.pk, amount)


def order_idiom(
    sender: Any, instance: Any, amount: Any, tags: list[str], placed_at: Any, **kwargs: Any
) -> None:
    pk = instance.pk
    transaction.on_commit(
        lambda: record_order.delay(pk, amount=amount, tags=tags, placed_at=placed_at)
    )


def order_delay_on_commit(
    sender: Any, instance: Any, amount: Any, tags: list[str], placed_at: Any, **kwargs: Any
) -> None:
    record_order.delay_on_commit(instance.pk, amount=amount, tags=tags, placed_at=placed_at)


def order_sync(sender: Any, instance: Any, amount: Any, **kwargs: Any) -> None:
    touch(instance.pk, amount)


# --- case 3: one send, 1 or 10 deferred handlers ------------------------------------------


def _fanout_handler(number: int) -> Callable[..., None]:
    def handler(sender: Any, instance: Any, **kwargs: Any) -> None:
        touch(instance.pk, number)

    # Registered under an explicit name= (a nested function has no importable qualname).
    handler.__name__ = handler.__qualname__ = f"fanout_{number}"
    return handler


FANOUT_HANDLERS = [_fanout_handler(number) for number in range(10)]
FANOUT_NAMES = [f"benchmarks.fanout_{number}" for number in range(10)]


class Probe:
    """A kwarg whose registered codec counts how often deferred_signals encodes a send."""

    __slots__ = ()


class ProbeCounter:
    """How many times deferred_signals encoded a :class:`Probe` so far."""

    encodes = 0


def _encode_probe(value: Probe) -> int:
    ProbeCounter.encodes += 1
    return 0


register_codec(Probe, name="benchmarks-probe", encode=_encode_probe, decode=lambda data: Probe())


# --- end to end (benchmarks.endtoend): run by a real worker --------------------------------

_redis: dict[int, Any] = {}


def e2e_record(task_name: str, committed_at: float | None) -> None:
    """Count a run, and how long after its commit it started (Redis: the bench reads it)."""
    import os
    import time

    from benchmarks import settings
    from benchmarks.services import redis_client

    started = time.time()
    client = _redis.get(os.getpid())
    if client is None:
        client = _redis[os.getpid()] = redis_client()
    prefix = f"e2e-{settings.QUEUE}"
    pipe = client.pipeline(transaction=False)
    pipe.incr(f"{prefix}:count")
    pipe.set(f"{prefix}:last", started)
    pipe.set(f"{prefix}:first", started, nx=True)
    if committed_at is not None:
        pipe.rpush(f"{prefix}:latency:{task_name}", started - committed_at)
    pipe.execute()


def _committed_at() -> float | None:
    from celery import current_task

    at = current_task.request.kwargs.get("at") if current_task else None
    return float(at) if at is not None else None


def e2e_deferred(sender: Any, instance: Any, **kwargs: Any) -> None:
    e2e_record("on_commit", _committed_at())
    touch(instance.pk)


def e2e_deferred_outbox(sender: Any, instance: Any, **kwargs: Any) -> None:
    e2e_record("outbox", _committed_at())
    touch(instance.pk)


@shared_task(name="benchmarks.e2e_plain", ignore_result=True)
def e2e_plain(pk: int, at: float | None = None) -> None:
    """The baseline: a plain task that fetches the row itself.

    It records its start once it has the row, where a deferred handler starts (after the
    worker fetched its instance), so both latencies run from commit to the same point.
    """
    from benchmarks.benchapp.models import Item

    item = Item.objects.get(pk=pk)
    e2e_record("idiom", at)
    touch(item.pk)


def e2e_idiom(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    import time

    pk = instance.pk
    transaction.on_commit(lambda: e2e_plain.delay(pk, time.time()))


E2E_NAMES = {"on_commit": "bench.e2e", "outbox": "bench.e2e.outbox"}


def register_e2e() -> None:
    """In the worker process: the deferred handlers it must know (by name, as in a project)."""
    from django.db.models.signals import post_save

    from deferred_signals import connect

    from .models import Item

    connect(post_save, e2e_deferred, sender=Item, defer=True, name=E2E_NAMES["on_commit"])
    connect(
        post_save,
        e2e_deferred_outbox,
        sender=Item,
        defer=True,
        name=E2E_NAMES["outbox"],
        delivery="outbox",
    )


@shared_task(name="benchmarks.worker_plain", ignore_result=True)
def worker_plain(pk: int) -> None:
    """benchmarks.workerpath's baseline: a plain task fetching the row, nothing recorded."""
    from benchmarks.benchapp.models import Item

    touch(Item.objects.get(pk=pk).pk)


@shared_task(name="benchmarks.worker_plain_ping", ignore_result=True)
def worker_plain_ping(key: str, n: int) -> None:
    """benchmarks.workerpath's baseline with no row: the arguments only."""
    touch(key, n)
