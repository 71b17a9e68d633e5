"""Coalescing (``coalesce=True``): one handler's calls for one row in one transaction, one call.

Calls of a coalescing handler for the same signal, sender and instance (model and pk) made
within one transaction are collapsed into one call at commit: the last call's arguments win,
``created`` is true if any collapsed call had it, ``update_fields`` is the union of theirs (or
``None`` if any had ``None``). Calls without a saved instance are never coalesced.

Django's ``on_commit`` bookkeeping still decides what survives: each call is a callback of
its own, dropped with a rolled-back savepoint, so the earlier calls stay when a later one is
rolled back. What survives is known only at commit, when the surviving callbacks run; so a
call's callback only marks it as survived, and a *finisher*, registered after it at the
level of the whole transaction (never dropped by a savepoint), publishes the merge of the
survivors once, after all of them ran.

In outbox mode the group keeps one outbox row: the first call inserts it, later ones update
its body with the merge so far, inside their own savepoint, so a rolled-back call rolls its
update back with it. The published call carries that row's id, and the row is deleted with
the batch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from django.db import DatabaseError, transaction

from . import commit_guard, dispatch, outbox, outbox_buffer
from .codec import TAG
from .conf import conf
from .exceptions import OutboxWriteError
from .ids import uuid4

Key = tuple[Hashable, ...]

#: Tagged encodings of a collection whose items can be united (``update_fields``).
_UNITED = ("frozenset", "set")


class _Member(dispatch.CommitHook):
    """One coalesced call's ``on_commit`` callback: running at commit proves it survived.

    ``body`` is the merge of the group's surviving calls up to this one; ``row`` the id of
    the group's outbox row (and of the call published for the group).
    """

    __slots__ = ("body", "call", "index", "ran", "row", "sids")

    def __init__(self, call: dispatch.PendingCall, body: dict[str, Any], row: str) -> None:
        self.call = call
        self.body = body
        self.row = row
        self.ran = False
        self.index = 0
        self.sids: set[Any] = set()

    def __call__(self) -> None:
        self.ran = True

    def take(self) -> None:
        self.ran = True  # in the commit's list: it survived, its finisher (after it) merges it

    def __repr__(self) -> str:
        return f"<coalesced call {self.call.handler.name} [{self.call.id}]>"


class _Transaction:
    """The coalesced calls of one transaction on one database connection."""

    __slots__ = ("anchor", "anchor_index", "chains", "connection", "finisher", "using")

    def __init__(self, connection: Any, using: str) -> None:
        self.connection = connection
        self.using = using
        #: Per key, the calls that may still survive, oldest first; a later call in the same
        #: savepoint context as the last one replaces it (they share a fate).
        self.chains: dict[Key, list[_Member]] = {}
        self.finisher: _Finisher | None = None
        self.anchor: _Finisher | None = None
        self.anchor_index = 0

    def alive(self) -> bool:
        """Still this transaction: its first finisher is pending (only its end removes it)."""
        return self.anchor is not None and _pending(self.connection, self.anchor, self.anchor_index)

    def add(
        self, call: dispatch.PendingCall, key: Key, announce: Callable[[], None] | None = None
    ) -> None:
        connection = self.connection
        commit_guard.ensure(connection)  # before the outbox row: it counts callbacks
        chain = self.chains.get(key)
        if chain is None:
            chain = self.chains[key] = []
        # Calls rolled back with a savepoint are the newest ones: drop them from the end.
        while chain and not _pending(connection, chain[-1], chain[-1].index):
            chain.pop()
        previous = chain[-1] if chain else None
        if previous is None:
            call.id = uuid4()
            body = call.body
        else:
            # The group's id: the one its merged call is published (and its row kept) under.
            call.id = previous.row
            body = merge(previous.body, call.body)
        if announce is not None:
            announce()
        member = _Member(call, body, call.id)
        if call.outbox and not conf.eager:
            _write_outbox(member, previous is None, self.using)
        robust = dispatch.robust()
        connection.on_commit(member, robust=robust)
        callbacks = connection.run_on_commit
        member.index = len(callbacks) - 1
        member.sids = callbacks[-1][0] - {None}
        if previous is not None and previous.sids == member.sids:
            chain[-1] = member
        else:
            chain.append(member)
        # The finisher belongs to the whole transaction: no savepoint id, so no savepoint
        # rollback drops it (Django keeps (savepoint ids, callback, robust) per callback).
        finisher = self.finisher = _Finisher(self)
        callbacks.append((set(), finisher, robust))
        if self.anchor is None:
            self.anchor, self.anchor_index = finisher, len(callbacks) - 1

    def release(self) -> None:
        """Publish each group whose calls survived, as one call (the latest finisher runs it)."""
        calls = self.take()
        if calls:
            dispatch.flush(calls, self.using)

    def take(self) -> list[dispatch.PendingCall]:
        """The merged call of each group whose calls survived, taken from the groups."""
        calls = []
        for key, chain in list(self.chains.items()):
            survivor = next((member for member in reversed(chain) if member.ran), None)
            if survivor is None:
                continue  # not run yet: a test's capture ran only callbacks made inside it
            del self.chains[key]
            handler, outbox_row = survivor.call.handler, survivor.call.outbox
            merged = dispatch.PendingCall(handler, survivor.row, survivor.body, outbox_row)
            merged.after = survivor.call.after
            calls.append(merged)
        if not self.chains and _open.get(self.connection) is self:
            del _open[self.connection]
        return calls


class _Finisher(dispatch.CommitHook):
    __slots__ = ("transaction",)

    def __init__(self, transaction: _Transaction) -> None:
        self.transaction = transaction

    def __call__(self) -> None:
        if self.transaction.finisher is self:  # earlier finishers stand for it
            dispatch._guarded(self.transaction.release)

    def take(self) -> tuple[list[dispatch.PendingCall], str] | None:
        if self.transaction.finisher is not self:
            return None
        calls = self.transaction.take()
        return (calls, self.transaction.using) if calls else None

    def __repr__(self) -> str:
        return "<deferred_signals coalesced calls>"


_open: weakref.WeakKeyDictionary[Any, _Transaction] = weakref.WeakKeyDictionary()


def enqueue(
    call: dispatch.PendingCall,
    using: str,
    key: Key,
    announce: Callable[[], None] | None = None,
) -> None:
    """Send ``call`` at commit of ``using``'s transaction, merged with the same key's calls.

    Gives ``call`` its id: a new one, or its group's when it joins calls made before it;
    then calls ``announce`` (``call_deferred``), before anything is published.
    """
    connection = transaction.get_connection(using)
    if not connection.in_atomic_block or (
        dispatch.capture is not None and _test_autocommit(connection)
    ):
        call.id = uuid4()
        if announce is not None:
            announce()
        dispatch.enqueue(call, using)  # nothing to coalesce with: published at once
        return
    current = _open.get(connection)
    if current is None or not current.alive():
        current = _open[connection] = _Transaction(connection, using)
    current.add(call, (call.handler.name, *key), announce)


def _test_autocommit(connection: Any) -> bool:
    """A test capturing deferred calls (:mod:`testing`) at its ``TestCase``'s own level,
    which stands for autocommit: each call counts at once there, none is coalesced."""
    from .testing import at_test_level

    return at_test_level(connection)


def _pending(connection: Any, callback: Any, registered_at: int) -> bool:
    """Is ``callback``, registered at ``registered_at``, still among the commit callbacks?

    Entries only ever leave (savepoint rollback, end of the transaction) or join at the end,
    so one registered at index i is now at index i or before: usually still at i. (A
    savepoint rollback copies the entries: compare callbacks, not entries.)
    """
    callbacks = connection.run_on_commit
    start = min(registered_at, len(callbacks) - 1)
    return any(callbacks[index][1] is callback for index in range(start, -1, -1))


def merge(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``later``'s call, with ``created`` and ``update_fields`` of both (the documented rule)."""
    kwargs = dict(later["kwargs"])
    before = earlier["kwargs"]
    if before.get("created") is True and "created" in kwargs:
        kwargs["created"] = True
    if "update_fields" in kwargs and "update_fields" in before:
        kwargs["update_fields"] = _union(before["update_fields"], kwargs["update_fields"])
    return {**later, "kwargs": kwargs}


def _union(earlier: Any, later: Any) -> Any:
    if earlier is None or later is None:
        return None  # a full save: every field
    if (
        type(earlier) is dict
        and type(later) is dict
        and earlier.get(TAG) in _UNITED
        and later.get(TAG) in _UNITED
    ):
        items = list(later["v"])
        items += [item for item in earlier["v"] if item not in items]
        with contextlib.suppress(TypeError):  # unorderable items keep their order
            items.sort()
        return {TAG: later[TAG], "v": items}
    if type(earlier) is list and type(later) is list:
        return later + [item for item in earlier if item not in later]
    return later


def _write_outbox(member: _Member, first: bool, using: str) -> None:
    if first:
        outbox.write(member.call, using, anchor=member)  # raises OutboxWriteError
        return
    try:
        outbox.rewrite(member.row, member.body, using)
    except OutboxWriteError:
        raise  # the waiting rows written before the UPDATE: named already
    except DatabaseError as error:
        handler = member.call.handler.name
        raise outbox_buffer.write_error([handler], 1, using, error) from error
