"""Outbox rows written inside a transaction, one multi-row INSERT instead of one per call.

``delivery="outbox"`` writes each call's row in the transaction that sent the signal, so the
row commits if and only if that transaction commits, savepoints included. A transaction's
first row is inserted at once (a missing table fails at the send, naming the handler); the
next ones wait in a buffer of that connection (one per database alias and thread) and go
out together, in one statement per :data:`MAX_ROWS` rows:

- **before any other statement on the connection**: an entry at the head of the
  connection's ``execute_wrappers``, present only while rows wait. Django runs
  ``SAVEPOINT``, ``RELEASE SAVEPOINT`` and ``ROLLBACK TO SAVEPOINT`` through cursors too, so
  the rows reach the database before the savepoint statement and the database decides their
  fate, exactly as with one INSERT per call. (Before a ``ROLLBACK`` statement they are
  dropped instead: everything written since the last savepoint statement is rolled back.)
  A query of the outbox table in the transaction sees them, as before.
- **right before the commit**, which Django runs on the driver's connection, not through a
  cursor, and for which it has no hook: while rows wait, the connection's ``commit`` is
  wrapped on that one instance (never on the class, so other connections and threads pay
  nothing) and the wrap removes itself. A failure there rolls the transaction back and
  raises :class:`~deferred_signals.exceptions.OutboxWriteError`: never business data
  committed without its calls.
- **when :data:`MAX_ROWS` wait**, from the send.

A rolled-back transaction or a closed connection drops what waits: Django empties its list
of commit callbacks then, so the buffer is live only while the commit callback registered
with its first row (the *anchor*) is still on that list. A failed INSERT inside an atomic
block marks the transaction for rollback (``needs_rollback``), as Django does for a failed
query: calls whose rows are missing must never commit.

SQL run on the driver's connection or cursor directly (``connection.connection``,
``cursor.cursor``), or through ``cursor.callproc()``, which Django does not wrap, does not
flush: read the outbox through Django's cursors.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from django.db import DatabaseError, Error
from django.utils import timezone

from .conf import conf
from .exceptions import OutboxWriteError

#: Rows per INSERT statement (fewer where the backend limits query parameters: SQLite 999).
#: As fast as 500 for 1,000 calls, for a fifth of the memory held until the INSERT.
MAX_ROWS = 100
#: What each row binds: id, handler, body, created, next_attempt_at, trace.
ROW_PARAMS = 6
_COLUMNS = (
    "id",
    "handler",
    "body",
    "created",
    "attempts",
    "next_attempt_at",
    "last_error",
    "trace",
)
#: Per row: the six parameters, and constants for attempts (0) and last_error ('').
_PLACEHOLDERS = ("%s", "%s", "%s", "%s", "0", "%s", "''", "%s")
#: The connection attribute holding its buffer: it lives and dies with the connection.
_ATTRIBUTE = "_deferred_signals_outbox"

Row = tuple[Any, ...]


def row(connection: Any, id: str, handler: str, body: str, trace: str = "") -> Row:
    """The parameters of one outbox row; the relay leaves it alone for ``OUTBOX_GRACE``."""
    now = timezone.now()
    due = now + datetime.timedelta(seconds=conf.outbox_grace)
    adapt = connection.ops.adapt_datetimefield_value
    return (id, handler, body, adapt(now), adapt(due), trace)


def write(connection: Any, using: str, new: Row, anchor: object) -> None:
    """Write ``new`` in the transaction open on ``connection``: now, or with the next ones.

    ``anchor`` is the commit callback the caller registers right after (its call): while it
    is pending, the transaction is the same one.
    """
    buffer: _Buffer | None = getattr(connection, _ATTRIBUTE, None)
    alive = buffer is not None and buffer.alive()
    if buffer is not None and buffer.rows and not alive:
        buffer.drop()  # a rolled-back transaction's rows, or a closed connection's
    if not connection.in_atomic_block:
        _insert_now(connection, using, [new])  # autocommit, or a manual transaction
    elif buffer is None or not alive:
        _insert_now(connection, using, [new])  # the transaction's first row
        buffer = _Buffer(connection, using, anchor, len(connection.run_on_commit))
        setattr(connection, _ATTRIBUTE, buffer)
    else:
        buffer.add(new)


def rewrite(connection: Any, id: str, body: str) -> bool:
    """Replace the body of the waiting row ``id``; False if it is not waiting (in the table)."""
    buffer: _Buffer | None = getattr(connection, _ATTRIBUTE, None)
    if buffer is None or id not in buffer.rows or not buffer.alive():
        return False
    buffer.rows[id] = (*buffer.rows[id][:2], body, *buffer.rows[id][3:])
    return True


def rows_per_statement(connection: Any) -> int:
    if not connection.features.has_bulk_insert:
        return 1
    limit = connection.features.max_query_params
    return MAX_ROWS if limit is None else max(1, min(MAX_ROWS, limit // ROW_PARAMS))


def insert(connection: Any, rows: Sequence[Row]) -> None:
    """INSERT ``rows``, as few statements as the backend allows."""
    from .models import OutboxCall  # not at import time: the app registry may not be ready

    meta = OutboxCall._meta
    fields = [meta.get_field(name) for name in _COLUMNS]
    head = (
        f"INSERT INTO {connection.ops.quote_name(meta.db_table)} "
        f"({', '.join(connection.ops.quote_name(name) for name in _COLUMNS)}) "
    )
    step = rows_per_statement(connection)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            values = connection.ops.bulk_insert_sql(fields, [_PLACEHOLDERS] * len(chunk))
            cursor.execute(head + values, [param for each in chunk for param in each])


def _insert_now(connection: Any, using: str, rows: Sequence[Row]) -> None:
    try:
        insert(connection, rows)
    except OutboxWriteError:
        raise  # rows that were waiting, written before this INSERT: named already
    except DatabaseError as error:
        raise write_error([each[1] for each in rows], len(rows), using, error) from error


def write_error(
    handlers: Iterable[str], calls: int, using: str, error: BaseException
) -> OutboxWriteError:
    """The error for ``calls`` calls of ``handlers`` that could not be written."""
    names = ", ".join(repr(name) for name in dict.fromkeys(handlers))
    which = f"Deferred handler {names}" if "," not in names else f"Deferred handlers {names}"
    written = "its call" if calls == 1 else f"their {calls} calls"
    return OutboxWriteError(
        f"{which} (delivery='outbox') could not write {written} to the outbox of database "
        f"{using!r}: {error}. Has `manage.py migrate deferred_signals --database={using}` run?"
    )


class _Buffer:
    """The rows waiting on one connection, for the transaction of ``anchor``."""

    def __init__(self, connection: Any, using: str, anchor: object, anchor_index: int) -> None:
        self.connection = connection
        self.using = using
        self.anchor = anchor
        self.anchor_index = anchor_index
        #: Call id to row, in send order (a coalesced call rewrites its row in place).
        self.rows: dict[str, Row] = {}
        self.limit = rows_per_statement(connection)
        #: Bound once: the wrapper is removed from the list by identity.
        self.hook: Callable[..., Any] = self.before_statement
        self.wrapped_commit: Callable[[], None] = self.commit
        self.previous_commit: Any = None

    def alive(self) -> bool:
        """Is the anchor still a pending commit callback? (Entries only ever leave: with a
        rolled-back savepoint, or all at once when the transaction ends.)"""
        callbacks = self.connection.run_on_commit
        start = min(self.anchor_index, len(callbacks) - 1)
        return any(callbacks[index][1] is self.anchor for index in range(start, -1, -1))

    def add(self, new: Row) -> None:
        if not self.rows:
            self.install()
        self.rows[new[0]] = new
        if len(self.rows) >= self.limit:
            self.flush()

    def flush(self) -> None:
        """INSERT what waits; on failure the transaction must not commit."""
        rows = list(self.rows.values())
        self.drop()
        try:
            insert(self.connection, rows)
        except BaseException as error:
            # Whatever stopped the INSERT (a database error, a worker's timeout signal), the
            # transaction must not commit without these rows.
            if self.connection.in_atomic_block:
                self.connection.needs_rollback = True
            if not isinstance(error, DatabaseError):
                raise
            raise write_error([each[1] for each in rows], len(rows), self.using, error) from error

    def drop(self) -> None:
        self.rows.clear()
        self.uninstall()

    def install(self) -> None:
        connection = self.connection
        # At the head: the outermost wrapper, so it runs first, and a project's
        # ``with connection.execute_wrapper(...)``, which pops the last entry, pops its own.
        connection.execute_wrappers.insert(0, self.hook)
        self.previous_commit = connection.__dict__.get("commit")
        connection.commit = self.wrapped_commit

    def uninstall(self) -> None:
        connection = self.connection
        with contextlib.suppress(ValueError):  # the project emptied the list
            connection.execute_wrappers.remove(self.hook)
        if connection.__dict__.get("commit") is self.wrapped_commit:
            if self.previous_commit is None:
                del connection.commit
            else:
                connection.commit = self.previous_commit

    def before_statement(
        self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        if not self.rows or self.connection.needs_rollback:
            pass  # the statement fails as Django says; the rows go with the rollback
        elif not self.alive():
            self.drop()
        elif isinstance(sql, str) and sql.lstrip()[:8].upper() == "ROLLBACK":
            self.drop()  # written since the last savepoint statement: rolled back anyway
        else:
            self.flush()
        return execute(sql, params, many, context)

    def commit(self) -> None:
        """The connection's ``commit`` while rows wait: INSERT them, then COMMIT."""
        connection = self.connection
        if self.rows and self.alive():
            try:
                self.flush()
            except BaseException:
                # Rolled back here: for anything but a DatabaseError, atomic() goes straight
                # to set_autocommit(True), which would COMMIT on SQLite and MySQL. atomic()
                # rolls back again after a DatabaseError, and closes the connection if that fails.
                with contextlib.suppress(Error):
                    connection.rollback()
                raise
        previous = self.previous_commit
        self.uninstall()
        # Not ``connection.commit()``: a wrap installed over this one would call it again.
        if previous is not None:
            previous()
        else:
            type(connection).commit(connection)
