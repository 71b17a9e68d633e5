"""Which databases hold an outbox the relay can drain, and what waits in each.

The relay asks at start (and each round, for an alias that did not answer) which aliases
have the outbox table and take writes; ``deferred_signals status`` and ``relay --once`` ask
how many rows wait, how old the oldest is, and when the first one left for later is due.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import DatabaseError, connections, router
from django.utils import timezone

logger = logging.getLogger("deferred_signals")


def discover() -> tuple[list[str], list[str]]:
    """The aliases the relay drains (they have the table and take writes), and those that
    may have it but could not be asked (unreachable): each one logged."""
    from .models import OutboxCall

    ready, unverified = [], []
    for alias in connections:
        if not router.allow_migrate_model(alias, OutboxCall):
            continue
        state = outbox_state(alias)
        if state is None:
            unverified.append(alias)
            logger.warning(
                "deferred_signals relay: database %r did not answer; asking it again each round",
                alias,
            )
        elif state:
            ready.append(alias)
    return ready, unverified


def has_outbox(using: str) -> bool:
    """Does ``using`` have the outbox table (False when it cannot be asked)?"""
    return _tables(using) is True


def outbox_state(using: str) -> bool | None:
    """Can the relay drain ``using``: it has the table and takes writes (None: no answer).

    A read-only database (a PostgreSQL standby or ``default_transaction_read_only``: a
    replica alias) holds a copy of another's rows: the relay leaves it alone, and says so.
    """
    found = _tables(using)
    if not found:
        return found
    connection = connections[using]
    if connection.vendor != "postgresql":
        return True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW transaction_read_only")
            read_only = cursor.fetchone()[0] == "on"
    except DatabaseError:
        return None
    if read_only:
        logger.warning(
            "deferred_signals relay: database %r is read-only (a replica?); not relaying it",
            using,
        )
        return False
    return True


def _tables(using: str) -> bool | None:
    from .models import OutboxCall

    try:
        with connections[using].cursor() as cursor:
            tables = connections[using].introspection.table_names(cursor)
    except DatabaseError:  # down, refusing connections: it may answer later
        return None
    except Exception:  # not a database to use here (a driver missing, access forbidden)
        return False
    return OutboxCall._meta.db_table in tables


def pending(using: str) -> dict[str, Any]:
    """How much waits in the outbox of ``using``: rows, and the age of the oldest."""
    from django.db.models import Count, Min

    from .models import OutboxCall

    stats = OutboxCall.objects.using(using).aggregate(rows=Count("id"), oldest=Min("created"))
    oldest = stats["oldest"]
    age = (timezone.now() - oldest).total_seconds() if oldest is not None else None
    return {"database": using, "pending": stats["rows"], "oldest_age_seconds": age}


def not_due(using: str) -> tuple[int, float | None]:
    """Rows of ``using`` a relay leaves for later (within ``OUTBOX_GRACE``, or backing off
    after a failed attempt), and the seconds until the first of them is due."""
    from django.db.models import Count, Min

    from .models import OutboxCall

    now = timezone.now()
    stats = (
        OutboxCall.objects.using(using)
        .filter(next_attempt_at__gt=now)
        .aggregate(rows=Count("id"), first=Min("next_attempt_at"))
    )
    first = stats["first"]
    return stats["rows"], (first - now).total_seconds() if first is not None else None
