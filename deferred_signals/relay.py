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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.db import DatabaseError, connections, transaction
from django.utils import timezone
from kombu.utils import json as kombu_json

from . import broker, deadletters, outbox, publisher, registry, sentry
from .codec import KOMBU_KEYS
from .conf import conf
from .dispatch import PendingCall
from .exceptions import DeferredSignalError, PublishTimeout
from .outbox import Claimed
from .outbox_status import discover, outbox_state
from .tasks import MESSAGE_KEYS

logger = logging.getLogger("deferred_signals")

#: Rows claimed per round: one transaction, one publish batch, one DELETE.
BATCH = 500
#: Idle polling: from the first sleep to the longest, doubling in between.
IDLE_SLEEP = (0.2, 5.0)
#: A database whose round failed (or that did not answer) rests before it is tried again:
#: from the first rest to the longest, doubling in between, while the others go on.
FAILURE_REST = (1.0, 60.0)


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
    """Publishes due outbox rows of ``databases`` (every alias with the table by default).

    One database failing (down, read-only, a statement refused) costs only its own rows: it
    is logged, rests (:data:`FAILURE_REST`) and is tried again, while the others go on. An
    alias that could not be asked at start whether it has the table (``unverified``) is
    asked again each round until it answers.
    """

    databases: list[str] = field(default_factory=list)
    batch: int = BATCH
    health_file: Path | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    on_round: Callable[[str, RoundResult], None] | None = None
    #: Aliases that may hold the outbox but did not answer at start.
    unverified: list[str] = field(default_factory=list)
    #: The error of each database whose last attempt failed, until one succeeds.
    failures: dict[str, BaseException] = field(default_factory=dict)
    #: Per failing database: (monotonic time it may be tried again, its last rest).
    _rest: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.databases and not self.unverified:
            self.databases, self.unverified = discover()

    def run_once(self) -> int:
        """Publish everything due now, on every database; return how many were published.

        A database that fails is left for a later call (see ``failures``); never raises for it.
        """
        self._verify()
        total = 0
        for using in self.databases:
            if self._resting(using):
                continue
            while not self.stopping.is_set():
                try:
                    result = self.round(using)
                except Exception as error:
                    self._failed(using, error)
                    break
                self._succeeded(using)
                total += result.published
                if result.broker_error is not None or result.published + result.failed_rows == 0:
                    break
        return total

    def _verify(self) -> None:
        """Ask the aliases that did not answer at start (and are not resting) again."""
        for using in list(self.unverified):
            if self._resting(using):
                continue
            state = outbox_state(using)
            if state is None:
                self._failed(using, DatabaseError(f"database {using!r} did not answer"))
                continue
            self.unverified.remove(using)
            self._succeeded(using)
            if state:
                self.databases.append(using)
                logger.warning(
                    "deferred_signals relay: database %r answers now; relaying its outbox", using
                )
            else:
                logger.warning(
                    "deferred_signals relay: database %r answers now and has no outbox to relay",
                    using,
                )

    def _resting(self, using: str) -> bool:
        rest = self._rest.get(using)
        return rest is not None and time.monotonic() < rest[0]

    def _failed(self, using: str, error: BaseException) -> None:
        previous = self._rest.get(using)
        rest = FAILURE_REST[0] if previous is None else min(FAILURE_REST[1], previous[1] * 2)
        self._rest[using] = (time.monotonic() + rest, rest)
        self.failures[using] = error
        logger.error(
            "deferred_signals relay: database %r failed (%s: %s); its rows wait, trying it "
            "again in %.0f s",
            using,
            type(error).__name__,
            error,
            rest,
            exc_info=not isinstance(error, DatabaseError),
        )
        # A broken connection is replaced at the next use rather than failing again.
        try:
            connections[using].close_if_unusable_or_obsolete()
        except Exception:
            logger.debug("deferred_signals relay: closing database %r failed", using)

    def _succeeded(self, using: str) -> None:
        if self._rest.pop(using, None) is not None:
            logger.warning("deferred_signals relay: database %r works again", using)
        self.failures.pop(using, None)

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
            try:
                self.on_round(using, result)
            except Exception:
                # The round is committed: its database did not fail, and must not rest.
                logger.exception(
                    "deferred_signals relay: the per-round hook failed after a round of %r",
                    using,
                )
        return result

    def _publish(self, rows: list[Claimed], using: str, result: RoundResult) -> None:
        calls, broken = [], []
        rows_by_id = {row.id: row for row in rows}
        for row in rows:
            try:
                calls.append(_call_of(row))
            except RowError as row_error:
                broken.append((row, row_error))
        # The round holds its rows' locks: one PUBLISH_TIMEOUT for all of its publishing,
        # the batch and the one-at-a-time attempts after it; what is left waits a round.
        deadline = time.monotonic() + conf.publish_timeout
        # Long after the request: the relay's own trace is not the handlers'; a row kept
        # with its request's trace continues that one (propagation, in the publisher).
        with sentry.detached():
            confirmed, error = publisher.publish(calls, deadline)
            done, left = publisher.taken(calls, confirmed, error)
            refused: list[tuple[PendingCall, BaseException]] = []
            if (
                left
                and error is not None
                and broker.is_refusal(error)
                and publisher.faulty_call(error) is None
            ):
                # The broker refused one of the messages without saying which (a channel
                # closed after a publish): one at a time, each confirmed, to find it.
                more, refused, error, left = _one_by_one(left, deadline)
                done += more
        result.published = len(done)
        try:
            outbox.delete([call.id for call in done], using, strict=True)
        except DatabaseError as failed_delete:
            # The round rolls back, the rows stay claimed by no one: they are published again
            # once this database works again, not in a loop while it refuses the DELETE.
            raise DatabaseError(
                f"published {len(done)} call(s) but could not delete their outbox rows, "
                f"which will be published again: {failed_delete}"
            ) from failed_delete
        for call, refusal in refused:
            broken.append(
                (rows_by_id[call.id], RowError(f"the broker refused it: {refusal!r:.300}"))
            )
        failing = rows_by_id.get(publisher.faulty_call(error) or "")
        if left and failing is not None:
            # Refused by the broker (its message, its queue) or failing on our side (a route,
            # a bug): it counts an attempt, so it cannot hold the rows behind it forever;
            # they go on in the next round.
            broken.append((failing, RowError(f"publishing it failed: {error!r:.300}")))
        elif left and isinstance(error, _TurnOver):
            result.broker_error = error  # this database's turn ends; the rest next round
            logger.info("deferred_signals relay: database %r: %s", using, ONE_BY_ONE_OVER)
        elif left:
            # The broker failed: the rows wait, without counting an attempt against them.
            result.broker_error = error
            logger.warning(
                "deferred_signals relay: the broker failed after %d of %d call(s) of "
                "database %r (%r); retrying later",
                len(done),
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
        """Say a loop completed: in the database (``status``), and in the health file, if
        any, when no database failed (a health file must mean healthy; a round that
        committed touches it too, through the command's ``on_round``)."""
        from .models import RelayHeartbeat

        now = timezone.now()
        for using in self.databases:
            if self._resting(using):
                continue  # failing: its error is logged already
            try:
                RelayHeartbeat.objects.using(using).update_or_create(
                    name=relay_name(), defaults={"last_loop_at": now}
                )
            except Exception:
                logger.exception("deferred_signals relay: could not record its heartbeat")
        if self.health_file is not None and not self.failures:
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


class _TurnOver(PublishTimeout):
    """One-at-a-time publishing used what was left of this round's PUBLISH_TIMEOUT: the
    rest wait."""


ONE_BY_ONE_OVER = (
    "publishing the rows one at a time used the round's PUBLISH_TIMEOUT; the rest wait for "
    "the next round"
)


def _one_by_one(
    calls: list[PendingCall], deadline: float
) -> tuple[
    list[PendingCall],
    list[tuple[PendingCall, BaseException]],
    BaseException | None,
    list[PendingCall],
]:
    """Publish ``calls`` one at a time, each confirmed before the next, so that a refusal
    names its call, until ``deadline`` (the round's): the ones published, the ones refused,
    and, if the broker failed or the time ran out, the error and the calls left from there
    on."""
    done: list[PendingCall] = []
    refused: list[tuple[PendingCall, BaseException]] = []
    for n, call in enumerate(calls):
        if time.monotonic() >= deadline:
            return done, refused, _TurnOver(ONE_BY_ONE_OVER, broker_answering=True), calls[n:]
        confirmed, error = publisher.publish([call], deadline)
        if confirmed:
            done.append(call)
        elif error is not None and broker.is_refusal(error):
            refused.append((call, error))
        else:
            return done, refused, error, calls[n:]
    return done, refused, None, []


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
