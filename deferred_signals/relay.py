"""The relay: publishes what the outbox holds (spilled calls, and what a crash left behind).

Each round claims due rows with ``SELECT ... FOR UPDATE SKIP LOCKED`` inside a transaction,
publishes them through the same bounded, confirmed path as a commit, deletes the confirmed
ones in one statement and commits: any number of relays, on any number of machines, share
the rows, each row going to one of them at a time. A broker outage costs nothing per row (the
relay backs off as a whole); a row that fails for a reason of its own (its handler is not
registered here, its body does not parse) backs off exponentially and, after
``RELAY_MAX_ATTEMPTS``, becomes a dead letter.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import connections, router, transaction
from django.utils import timezone
from kombu.utils import json as kombu_json

from . import deadletters, outbox, publisher, registry, sentry
from .codec import KOMBU_KEYS
from .conf import conf
from .dispatch import PendingCall
from .exceptions import DeferredSignalError
from .outbox import Claimed
from .tasks import MESSAGE_KEYS

logger = logging.getLogger("deferred_signals")

#: Rows claimed per round: one transaction, one publish batch, one DELETE.
BATCH = 500
#: Idle polling: from the first sleep to the longest, doubling in between.
IDLE_SLEEP = (0.2, 5.0)


class RowError(DeferredSignalError):
    """An outbox row that cannot be published for a reason of its own."""


@dataclass
class RoundResult:
    published: int = 0
    failed_rows: int = 0
    dead_lettered: int = 0
    broker_error: BaseException | None = None


@dataclass
class Relay:
    """Publishes due outbox rows of ``databases`` (every alias with the table by default)."""

    databases: list[str] = field(default_factory=list)
    batch: int = BATCH
    health_file: Path | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    on_round: Callable[[str, RoundResult], None] | None = None

    def __post_init__(self) -> None:
        if not self.databases:
            self.databases = outbox_databases()

    def run_once(self) -> int:
        """Publish everything due now, on every database; return how many were published."""
        total = 0
        for using in self.databases:
            while not self.stopping.is_set():
                result = self.round(using)
                total += result.published
                if result.broker_error is not None or result.published + result.failed_rows == 0:
                    break
        return total

    def run(self) -> None:
        """Relay until ``stopping`` is set (SIGTERM/SIGINT), finishing the round in hand."""
        sleep = IDLE_SLEEP[0]
        while not self.stopping.is_set():
            published = self.run_once()
            self.heartbeat()
            if published:
                sleep = IDLE_SLEEP[0]
                continue
            self.stopping.wait(sleep)
            sleep = min(IDLE_SLEEP[1], sleep * 2)

    def round(self, using: str) -> RoundResult:
        """Claim up to ``batch`` due rows of ``using``, publish them, commit."""
        result = RoundResult()
        with transaction.atomic(using=using):
            rows = outbox.claim(using, self.batch)
            if rows:
                self._publish(rows, using, result)
        if self.on_round is not None:
            self.on_round(using, result)
        return result

    def _publish(self, rows: list[Claimed], using: str, result: RoundResult) -> None:
        calls, broken = [], []
        rows_by_id = {row.id: row for row in rows}
        for row in rows:
            try:
                calls.append(_call_of(row))
            except RowError as row_error:
                broken.append((row, row_error))
        # Long after the request: the relay's own trace is not the handlers'; a row kept
        # with its request's trace continues that one (propagation, in the publisher).
        with sentry.detached():
            confirmed, error = publisher.publish(calls)
        result.published = confirmed
        outbox.delete([call.id for call in calls[:confirmed]], using)
        failing = rows_by_id.get(publisher.faulty_call(error) or "")
        if confirmed < len(calls) and failing is not None:
            # Building or handing over this row's message raised on our side, not the
            # broker's (a route, a bug): it counts an attempt, so it cannot hold the rows
            # behind it forever; they go on in the next round.
            broken.append((failing, RowError(f"publishing it failed: {error!r:.300}")))
        elif confirmed < len(calls):
            # The broker failed: the rows wait, without counting an attempt against them.
            result.broker_error = error
            logger.warning(
                "deferred_signals relay: the broker failed after %d of %d call(s) of "
                "database %r (%r); retrying later",
                confirmed,
                len(calls),
                using,
                error,
            )
        for row, reason in broken:
            result.failed_rows += 1
            if row.attempts + 1 >= conf.relay_max_attempts:
                if _dead_letter(row, reason, using):
                    result.dead_lettered += 1
            else:
                outbox.retry_later([row], using, reason)

    def heartbeat(self) -> None:
        """Say a loop completed: in the database (``status``) and the health file, if any."""
        from .models import RelayHeartbeat

        now = timezone.now()
        for using in self.databases:
            try:
                RelayHeartbeat.objects.using(using).update_or_create(
                    name=relay_name(), defaults={"last_loop_at": now}
                )
            except Exception:
                logger.exception("deferred_signals relay: could not record its heartbeat")
        if self.health_file is not None:
            self.health_file.touch()

    def forget_heartbeat(self) -> None:
        """Remove this process's heartbeat, on a clean exit: ``status`` lists running relays."""
        from .models import RelayHeartbeat

        for using in self.databases:
            try:
                RelayHeartbeat.objects.using(using).filter(name=relay_name()).delete()
            except Exception:
                logger.exception("deferred_signals relay: could not remove its heartbeat")


def freeze_heap() -> None:
    """For a process that relays from now on (the command): keep every object alive now,
    Django's, Celery's and the project's, out of the garbage collector's full passes.

    Each round leaves thousands of objects behind long enough to count as old, and every
    few rounds that sets off a full collection, which walks the whole heap: ~15% of the
    time of a 5,000-row ``run_once()`` in the benchmark. Garbage is collected first; what
    is frozen is only ever freed by reference counting.
    """
    gc.collect()
    gc.freeze()


def relay_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def outbox_databases() -> list[str]:
    """The aliases whose outbox the relay should drain: every one that may hold the table."""
    from .models import OutboxCall

    return [
        alias
        for alias in connections
        if router.allow_migrate_model(alias, OutboxCall) and has_outbox(alias)
    ]


def has_outbox(using: str) -> bool:
    from .models import OutboxCall

    try:
        with connections[using].cursor() as cursor:
            tables = connections[using].introspection.table_names(cursor)
    except Exception:
        return False
    return OutboxCall._meta.db_table in tables


def _call_of(row: Claimed) -> PendingCall:
    handler = registry.get(row.handler)
    if handler is None:
        raise RowError(
            f"no deferred handler is registered as {row.handler!r} in this relay process "
            "(renamed or removed? see aliases=)"
        )
    text: str | None = row.body
    try:
        # kombu's decoder calls a hook on every object, for the forms its encoder gives
        # types JSON lacks; our bodies have none (the codec tags them), so plain JSON reads
        # the same values unless the text holds the key kombu looks for.
        if KOMBU_KEYS in row.body:
            body, text = kombu_json.loads(row.body), None
        else:
            body = json.loads(row.body)
    except ValueError as error:
        raise RowError(f"the stored body is not JSON: {error}") from None
    if type(body) is not dict:
        raise RowError("the stored body is not a JSON object")
    if not body.keys() >= MESSAGE_KEYS or type(body["kwargs"]) is not dict:
        # Refused here, with a reason a reader understands, rather than by the builder's
        # KeyError, which would also stop the batch at this row for the round.
        raise RowError("the stored body is not a message this package sends")
    if "at" not in body:
        # When the call committed, for current_call(): the row's creation is the closest known.
        at = body["at"] = row.created.timestamp()
        text = None if text is None else _with_at(text, at)
    return PendingCall(handler, row.id, body, text=text, trace=row.trace or None)


def _with_at(text: str, at: float) -> str | None:
    """``text``, the JSON of an object, with ``"at"`` added last, as the encoder writes it
    (None, to encode the body again, for a text that does not end as body_text ends it)."""
    if not text.endswith("}"):
        return None
    opening = text[:-1].rstrip()
    separator = "" if opening == "{" else ", "
    return f'{opening}{separator}"at": {float.__repr__(at)}}}'


def _dead_letter(row: Claimed, error: BaseException, using: str) -> bool:
    """Move ``row`` to the dead letters; False (row kept, retried later) when they refuse it."""
    from .models import OutboxCall

    kept = deadletters.record(
        call_id=row.id,
        handler=row.handler,
        body=row.body,
        exception=error,
        attempts=row.attempts + 1,
    )
    if not kept and conf.dead_letters:
        # The dead-letter database refused it (logged by record()): the row is the only copy.
        outbox.retry_later([row], using, error)
        return False
    logger.error(
        "deferred_signals relay gave up on %s [%s] after %d attempts: %s",
        row.handler,
        row.id,
        row.attempts + 1,
        error,
    )
    OutboxCall.objects.using(using).filter(id=row.id).delete()
    return True


def pending(using: str) -> dict[str, Any]:
    """How much waits in the outbox of ``using``: rows, and the age of the oldest."""
    from django.db.models import Count, Min

    from .models import OutboxCall

    stats = OutboxCall.objects.using(using).aggregate(rows=Count("id"), oldest=Min("created"))
    oldest = stats["oldest"]
    age = (timezone.now() - oldest).total_seconds() if oldest is not None else None
    return {"database": using, "pending": stats["rows"], "oldest_age_seconds": age}
