"""The outbox table: calls written down until the broker confirms them.

Two ways in: ``write`` inside the transaction that sent the signal (``delivery="outbox"``: the
row commits or rolls back with the business data, savepoints included; a transaction's rows
go out in one INSERT, see :mod:`~deferred_signals.outbox_buffer`), and ``spill`` right
after a commit whose publish failed (a short transaction of its own). One way out: deleted,
in one statement per batch, once the broker confirmed the messages; what a crash or an outage
leaves behind, the relay publishes.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import connections, transaction
from django.utils import timezone
from kombu.utils import json as kombu_json

from . import outbox_buffer, propagation
from .conf import conf

if TYPE_CHECKING:
    from .dispatch import PendingCall

logger = logging.getLogger("deferred_signals")

#: Longest error text kept on a row (a kombu traceback summary, not the traceback).
ERROR_LENGTH = 2000


def body_text(body: dict[str, Any]) -> str:
    """The message body as the outbox keeps it: the JSON Celery would publish."""
    return str(kombu_json.dumps(body))


def write(call: PendingCall, using: str, anchor: object | None = None) -> None:
    """Write ``call``'s row in the transaction open on ``using`` (at once outside one).

    Inside an atomic block the rows after the transaction's first one wait and go out in
    one INSERT before the connection's next statement or its commit
    (:mod:`~deferred_signals.outbox_buffer`). ``anchor``: the commit callback the caller
    registers right after (default: the call itself). Raises
    :class:`~deferred_signals.exceptions.OutboxWriteError`. The relay leaves the row alone
    for ``OUTBOX_GRACE`` seconds: the request publishes and deletes it right after the commit.
    """
    connection = connections[using]
    row = outbox_buffer.row(
        connection, call.id, call.handler.name, body_text(call.body), propagation.capture()
    )
    outbox_buffer.write(connection, using, row, call if anchor is None else anchor)


def hold(call: PendingCall, using: str) -> None:
    """Write ``call``'s row now, in the transaction open on ``using``, for the relay to
    publish if nobody confirms it within ``OUTBOX_GRACE`` (a replay's claimed letter).

    A row its call id has already (a replay before this one, whose call waits for the
    relay) stands for the call: publishing it now deletes that row. Raises what the
    database raised.
    """
    from .models import OutboxCall

    now = timezone.now()
    row = OutboxCall(
        id=call.id,
        handler=call.handler.name,
        body=body_text(call.body),
        created=now,
        next_attempt_at=now + datetime.timedelta(seconds=conf.outbox_grace),
        trace=propagation.capture(),
    )
    OutboxCall.objects.using(using).bulk_create([row], ignore_conflicts=True)


def rewrite(id: str, body: dict[str, Any], using: str) -> None:
    """Replace the body of the row ``id`` written in this transaction (a coalesced call)."""
    from .models import OutboxCall

    connection = connections[using]
    text = body_text(body)
    if outbox_buffer.rewrite(connection, id, text):
        return  # still waiting to be written: written with this body
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {connection.ops.quote_name(OutboxCall._meta.db_table)} "
            "SET body = %s WHERE id = %s",
            [text, id],
        )


def spill(calls: Sequence[PendingCall], using: str, error: BaseException | None) -> bool:
    """Write committed calls that could not be published, in a transaction of their own.

    A call whose id already has a row (a replay spilled before, still waiting) is kept by
    that row. Returns False when the database failed too: the calls are then lost, and logged.
    """
    from .models import OutboxCall

    now = timezone.now()
    trace = propagation.capture()  # right after the commit: still the request's trace
    rows = [
        OutboxCall(
            id=call.id,
            handler=call.handler.name,
            body=body_text(call.body),
            created=now,
            next_attempt_at=now,
            last_error=_error_text(error),
            trace=trace,
        )
        for call in calls
    ]
    try:
        with transaction.atomic(using=using):
            # The same call id is the same call: the row there stands for it, and one
            # conflict must not cost the other calls of the batch their rows.
            OutboxCall.objects.using(using).bulk_create(rows, ignore_conflicts=True)
    except Exception:
        logger.exception(
            "deferred_signals LOST %d committed call(s): the broker failed (%r) and so did "
            "writing them to the outbox of database %r: %s",
            len(calls),
            error,
            using,
            ", ".join(f"{call.handler.name}[{call.id}]" for call in calls),
        )
        return False
    return True


def delete(ids: Sequence[str], using: str, *, strict: bool = False) -> None:
    """Forget published calls (one statement). A failure only means the relay sends them
    again later: at-least-once. It is logged, or raised with ``strict`` (the relay, whose
    transaction a failed statement aborts)."""
    from .models import OutboxCall

    if not ids:
        return
    connection = connections[using]
    try:
        # One plain statement: the ORM's delete() collects first (~0.1 ms on the request path).
        with connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {connection.ops.quote_name(OutboxCall._meta.db_table)} "
                f"WHERE id IN ({', '.join(['%s'] * len(ids))})",
                list(ids),
            )
    except Exception:
        if strict:
            raise
        logger.exception(
            "deferred_signals published %d call(s) but could not delete their outbox rows "
            "in database %r: the relay will publish them again",
            len(ids),
            using,
        )


def make_due(ids: Sequence[str], using: str, error: BaseException | None) -> None:
    """Outbox rows whose publish failed right after commit: the relay may take them now."""
    from .models import OutboxCall

    if not ids:
        return
    try:
        OutboxCall.objects.using(using).filter(id__in=ids).update(
            next_attempt_at=timezone.now(), last_error=_error_text(error)
        )
    except Exception:
        # They stay due after the grace period anyway.
        logger.exception("deferred_signals could not mark %d outbox row(s) as due", len(ids))


class Claimed(NamedTuple):
    """An outbox row the relay has locked: only the columns it reads, no model instance."""

    id: str
    handler: str
    #: The JSON text :func:`body_text` wrote.
    body: str
    attempts: int
    created: datetime.datetime
    #: The trace the call was made in (:func:`propagation.capture`), or "".
    trace: str


def claim(using: str, limit: int) -> list[Claimed]:
    """Lock up to ``limit`` due rows for this relay; call inside ``transaction.atomic``.

    With ``SKIP LOCKED`` (PostgreSQL, MySQL 8, MariaDB 10.6+, Oracle) any number of relays
    share the work, each row going to one of them; elsewhere (SQLite) run a single relay.
    """
    from .models import OutboxCall

    queryset = OutboxCall.objects.using(using).filter(next_attempt_at__lte=timezone.now())
    if connections[using].features.has_select_for_update_skip_locked:
        queryset = queryset.select_for_update(skip_locked=True)
    # Tuples of the columns read: model instances (and a second timestamp to parse) cost
    # the relay more than publishing the row does.
    rows = queryset.order_by("next_attempt_at").values_list(*Claimed._fields)[:limit]
    return [Claimed(*row) for row in rows]


def retry_later(rows: Iterable[Claimed], using: str, error: BaseException) -> None:
    """Rows the relay failed to publish for a reason of their own: back off exponentially."""
    from .models import OutboxCall

    now = timezone.now()
    for row in rows:
        attempts = row.attempts + 1
        OutboxCall.objects.using(using).filter(id=row.id).update(
            attempts=attempts,
            last_error=_error_text(error),
            next_attempt_at=now + datetime.timedelta(seconds=min(3600, 2**attempts)),
        )


def _error_text(error: BaseException | None) -> str:
    return "" if error is None else f"{type(error).__name__}: {error}"[:ERROR_LENGTH]
