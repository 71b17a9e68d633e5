"""The measured cases: what each transaction does and which idioms are compared.

Each idiom is a :class:`Variant` that connects its receivers for the time it is measured.
Within a round every variant of a case runs back to back (in an order rotated from round
to round), so a slow patch of a shared machine hits them alike and per-round ratios hold.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import F
from django.db.models.signals import post_save
from django.dispatch import Signal

from benchmarks.benchapp import handlers
from benchmarks.benchapp.models import Item
from benchmarks.services import BrokerTraffic
from benchmarks.stats import Samples
from deferred_signals import connect

Work = Callable[[], float]


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    #: Publishes to the broker: skipped when Redis is down.
    needs_broker: bool
    #: Messages one unit of work must leave in the queue (checked after every batch).
    messages: int
    install: Callable[[], AbstractContextManager[None]] = nullcontext


@dataclass
class Measured:
    """Everything measured for one variant of one case."""

    variant: Variant
    samples: Samples = field(default_factory=Samples)
    traffic: BrokerTraffic | None = None
    traffic_units: int = 1
    peak_memory: int | None = None
    skipped: str = ""


@contextmanager
def plain(signal: Signal, func: Callable[..., Any], sender: Any = None) -> Iterator[None]:
    """A Django receiver, connected strongly for the block."""
    signal.connect(func, sender=sender, weak=False)
    try:
        yield
    finally:
        _disconnect(signal, func, sender)


@contextmanager
def plain_many(signal: Signal, funcs: Sequence[Callable[..., Any]], sender: Any) -> Iterator[None]:
    for func in funcs:
        signal.connect(func, sender=sender, weak=False)
    try:
        yield
    finally:
        for func in funcs:
            _disconnect(signal, func, sender)


@contextmanager
def deferred(
    signal: Signal,
    funcs: Sequence[Callable[..., Any]],
    names: Sequence[str],
    sender: Any = None,
    **options: Any,
) -> Iterator[None]:
    """deferred_signals handlers, through the public ``connect(..., defer=True)``.

    A name stands for one set of options (the registry refuses a second set): the outbox
    and coalescing variants register the same function under names of their own.
    """
    for func, name in zip(funcs, names, strict=True):
        connect(signal, func, sender=sender, defer=True, name=name, **options)
    try:
        yield
    finally:
        for func in funcs:
            _disconnect(signal, func, sender)


OUTBOX = {"delivery": "outbox"}


@contextmanager
def outbox_row_by_row(
    signal: Signal, funcs: Sequence[Callable[..., Any]], names: Sequence[str]
) -> Iterator[None]:
    """Outbox mode writing one INSERT per call, as before rows were written together:
    what the multi-row INSERT saves, measured in the same run."""
    from deferred_signals import outbox_buffer

    rows, outbox_buffer.MAX_ROWS = outbox_buffer.MAX_ROWS, 1
    try:
        with deferred(signal, funcs, names, **OUTBOX):
            yield
    finally:
        outbox_buffer.MAX_ROWS = rows


def _disconnect(signal: Signal, func: Callable[..., Any], sender: Any) -> None:
    # A receiver left connected would add its cost to every later variant: fail loudly.
    if not signal.disconnect(func, sender=sender):
        raise RuntimeError(f"{func.__qualname__} was not connected to {signal!r}")


def timed(action: Callable[[], None]) -> Work:
    def work() -> float:
        start = time.perf_counter()
        action()
        return time.perf_counter() - start

    return work


# --- case 1: one transaction saving one row -----------------------------------------------

PRICE = Decimal("9.99")


def save_one_row() -> None:
    with transaction.atomic():
        Item.objects.create(name="widget", quantity=1, price=PRICE)


CASE1 = [
    Variant("none", "(a) no handler (baseline)", False, 0),
    Variant(
        "deferred",
        "(b) deferred_signals defer=True",
        True,
        1,
        lambda: deferred(post_save, [handlers.saved_deferred], ["bench.saved"], Item),
    ),
    Variant(
        "outbox",
        "(b') deferred_signals, delivery='outbox'",
        True,
        1,
        lambda: deferred(
            post_save, [handlers.saved_deferred], ["bench.saved.outbox"], Item, **OUTBOX
        ),
    ),
    Variant(
        "idiom",
        "(c) on_commit(lambda: task.delay())",
        True,
        1,
        lambda: plain(post_save, handlers.saved_idiom, Item),
    ),
    Variant(
        "delay_on_commit",
        "(d) task.delay_on_commit()",
        True,
        1,
        lambda: plain(post_save, handlers.saved_delay_on_commit, Item),
    ),
    Variant(
        "sync",
        "(e) synchronous handler",
        False,
        0,
        lambda: plain(post_save, handlers.saved_sync, Item),
    ),
]


# --- case 2: one transaction firing 1,000 signals -----------------------------------------

SIGNALS_PER_TRANSACTION = 1000
TAGS = ["bench", "bulk"]
PLACED_AT = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.timezone.utc)


def fire_thousand(items: Sequence[Item]) -> None:
    """One write, then one ``order_placed`` per item: signals with a model and a few kwargs."""
    with transaction.atomic():
        Item.objects.filter(pk=items[0].pk).update(quantity=F("quantity") + 1)
        for item in items:
            handlers.order_placed.send(
                sender=Item, instance=item, amount=item.price, tags=TAGS, placed_at=PLACED_AT
            )


CASE2 = [
    Variant("none", "no receiver (Django's send alone)", False, 0),
    Variant(
        "deferred",
        "deferred_signals defer=True",
        True,
        SIGNALS_PER_TRANSACTION,
        lambda: deferred(handlers.order_placed, [handlers.order_deferred], ["bench.order"]),
    ),
    Variant(
        "outbox",
        "deferred_signals, delivery='outbox'",
        True,
        SIGNALS_PER_TRANSACTION,
        lambda: deferred(
            handlers.order_placed, [handlers.order_deferred], ["bench.order.outbox"], **OUTBOX
        ),
    ),
    Variant(
        "outbox_row_by_row",
        "deferred_signals, delivery='outbox', one INSERT per call",
        True,
        SIGNALS_PER_TRANSACTION,
        lambda: outbox_row_by_row(
            handlers.order_placed, [handlers.order_deferred], ["bench.order.outbox"]
        ),
    ),
    Variant(
        "idiom",
        "on_commit(lambda: task.delay())",
        True,
        SIGNALS_PER_TRANSACTION,
        lambda: plain(handlers.order_placed, handlers.order_idiom),
    ),
    Variant(
        "delay_on_commit",
        "task.delay_on_commit()",
        True,
        SIGNALS_PER_TRANSACTION,
        lambda: plain(handlers.order_placed, handlers.order_delay_on_commit),
    ),
    Variant(
        "sync",
        "synchronous handler",
        False,
        0,
        lambda: plain(handlers.order_placed, handlers.order_sync),
    ),
]


# --- case 3: one send, 1 or 10 deferred handlers ------------------------------------------

SENDS_PER_SAMPLE = 20
PROBE = handlers.Probe()
# A payload whose encoding costs enough to see: 100 order lines with decimals and dates.
LINES = [
    {"sku": f"SKU-{n:05d}", "qty": n, "price": Decimal(n) / 4, "at": PLACED_AT} for n in range(100)
]
PAYLOADS: dict[str, dict[str, Any]] = {
    "light": {"probe": PROBE},
    "heavy": {"probe": PROBE, "lines": LINES},
}


def fanout_variant(count: int) -> Variant:
    return Variant(
        f"x{count}",
        f"{count} deferred handler{'s' if count > 1 else ''}",
        True,
        count,
        lambda: deferred(
            handlers.fanout, handlers.FANOUT_HANDLERS[:count], handlers.FANOUT_NAMES[:count]
        ),
    )


CASE3 = [fanout_variant(1), fanout_variant(10)]


def sends_only(item: Item, payload: dict[str, Any]) -> Work:
    """Time ``SENDS_PER_SAMPLE`` sends (per send), then roll back: nothing is published."""

    def work() -> float:
        with transaction.atomic():
            start = time.perf_counter()
            for _ in range(SENDS_PER_SAMPLE):
                handlers.fanout.send(sender=Item, instance=item, **payload)
            elapsed = time.perf_counter() - start
            transaction.set_rollback(True)
        return elapsed / SENDS_PER_SAMPLE

    return work


def send_and_commit(item: Item, payload: dict[str, Any]) -> Callable[[], None]:
    def action() -> None:
        with transaction.atomic():
            handlers.fanout.send(sender=Item, instance=item, **payload)

    return action


# --- case 3b: one row, ten post_save handlers ---------------------------------------------

TEN_NAMES = [f"bench.saved_{n}" for n in range(10)]
CASE3B = [
    Variant("none", "no receiver", False, 0),
    Variant(
        "deferred",
        "deferred_signals, 10 handlers",
        True,
        10,
        lambda: deferred(post_save, handlers.SAVED_TEN["deferred"], TEN_NAMES, Item),
    ),
    Variant(
        "outbox",
        "deferred_signals, 10 handlers, outbox",
        True,
        10,
        lambda: deferred(
            post_save,
            handlers.SAVED_TEN["deferred"],
            [f"{name}.outbox" for name in TEN_NAMES],
            Item,
            **OUTBOX,
        ),
    ),
    Variant(
        "idiom",
        "10 x on_commit(lambda: task.delay())",
        True,
        10,
        lambda: plain_many(post_save, handlers.SAVED_TEN["idiom"], Item),
    ),
    Variant(
        "delay_on_commit",
        "10 x task.delay_on_commit()",
        True,
        10,
        lambda: plain_many(post_save, handlers.SAVED_TEN["delay_on_commit"], Item),
    ),
]


# --- case 4: one row saved ten times, coalesce=True ----------------------------------------

SAVES = 10

#: A message's size as our Redis envelope stores it (case 1's, ~1.4 KB).
BARE_MESSAGE = b"x" * 1400


@contextmanager
def bare_publish() -> Iterator[None]:
    """The least any library that publishes after the commit can add: a receiver whose first
    call in a transaction registers one ``on_commit`` that writes one prepacked ``LPUSH`` on a
    socket kept open, and reads the reply. No encoding, no message building, no bookkeeping:
    the broker's round trip alone, the part that cannot go (``delivery="on_commit"`` needs
    the broker's answer before the request may go on)."""
    import socket

    from benchmarks import settings

    sock = socket.create_connection((settings.REDIS_HOST, settings.REDIS_PORT), timeout=3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def command(*parts: bytes) -> bytes:
        packed = b"*%d\r\n" % len(parts)
        for part in parts:
            packed += b"$%d\r\n%s\r\n" % (len(part), part)
        return packed

    sock.sendall(command(b"SELECT", str(settings.REDIS_DB).encode()))
    if not sock.recv(64).startswith(b"+OK"):
        raise RuntimeError("Redis refused SELECT")
    push = command(b"LPUSH", settings.QUEUE.encode(), BARE_MESSAGE)
    pending: list[bool] = []

    def publish() -> None:
        pending.clear()
        sock.sendall(push)
        if not sock.recv(64).startswith(b":"):
            raise RuntimeError("Redis refused LPUSH")

    def receiver(sender: Any, **kwargs: Any) -> None:
        if not pending:
            pending.append(True)
            transaction.on_commit(publish)

    try:
        with plain(post_save, receiver, Item):
            yield
    finally:
        sock.close()


CASE4 = [
    Variant("none", "no receiver", False, 0),
    Variant(
        "bare",
        "one bare LPUSH at commit (the least a publish costs)",
        True,
        1,
        bare_publish,
    ),
    Variant(
        "deferred",
        "deferred_signals coalesce=True",
        True,
        1,  # exactly one message for the ten saves
        lambda: deferred(
            post_save, [handlers.saved_deferred], ["bench.saved.coalesce"], Item, coalesce=True
        ),
    ),
    Variant(
        "outbox",
        "deferred_signals coalesce=True, outbox",
        True,
        1,
        lambda: deferred(
            post_save,
            [handlers.saved_deferred],
            ["bench.saved.coalesce.outbox"],
            Item,
            coalesce=True,
            **OUTBOX,
        ),
    ),
    Variant(
        "idiom",
        "on_commit(lambda: task.delay()), 10 saves",
        True,
        SAVES,
        lambda: plain(post_save, handlers.saved_idiom, Item),
    ),
    Variant(
        "delay_on_commit",
        "task.delay_on_commit(), 10 saves",
        True,
        SAVES,
        lambda: plain(post_save, handlers.saved_delay_on_commit, Item),
    ),
]


def save_ten_times(item: Item) -> None:
    with transaction.atomic():
        for n in range(SAVES):
            item.quantity = n
            item.save()
