"""After-commit delivery: attach each call to its transaction, publish a batch in one go.

Each call is an ``on_commit`` callback of its database alias's transaction, so Django's own
bookkeeping decides its fate: dropped on rollback, dropped with a rolled-back savepoint,
released by the outermost commit. Consecutive calls made in the same savepoint context form
a batch; the first of their callbacks to run publishes the batch through one producer, so a
transaction that fires a thousand signals does not make a thousand broker round trips.

What the broker does not confirm is written to the outbox (spilled, :mod:`spill`) for the
relay; calls of ``delivery="outbox"`` handlers were written there inside the transaction
already.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from django.db import transaction
from kombu.utils import json as kombu_json

from . import outbox, publisher, spill
from .calls import HANDLER_FAILED
from .conf import conf
from .exceptions import PublishTimeout
from .frozen import Frozen, thaw
from .registry import Handler
from .tasks import MESSAGE_VERSION, decode_call

logger = logging.getLogger("deferred_signals")

#: Set by :func:`deferred_signals.testing.capture_deferred` while a test captures deferred
#: calls: committed calls go to it, instead of to the broker or to ``EAGER``.
capture: Callable[[list[PendingCall], str], None] | None = None


class CommitHook:
    """A commit callback of the package's own, which a test's capture
    (:mod:`~deferred_signals.testing`) runs at what stands for a commit, or forgets: a call,
    coalescing's, a replay's. (:class:`_Held` is not one: calls wait for a second database
    only outside a capture.)"""

    __slots__ = ()

    def take(self) -> tuple[list[PendingCall], str] | None:
        """The calls this hook would hand over at commit, and their database, taken from it
        (it hands nothing over after): a commit cut short by a ``BaseException`` spills
        them (:func:`~deferred_signals.spill.spill_rest_of_commit`). None: no calls of its own."""
        return None


class PendingCall(CommitHook):
    """One handler call waiting for its transaction, and its own ``on_commit`` callback.

    ``body`` is the message body, already encoded. A call made by a signal keeps it frozen
    (:mod:`frozen`: tuples shared with the other calls of the same send and sender) and
    builds it on each read, so a reader gets a dict of its own: only :meth:`stamp` changes
    a call. ``outbox``: the call has an outbox row.
    """

    __slots__ = (
        "after",
        "at",
        "batch",
        "handler",
        "id",
        "kwargs",
        "outbox",
        "sender",
        "signal",
        "stored",
        "text",
        "trace",
    )

    def __init__(
        self,
        handler: Handler,
        id: str,
        body: dict[str, Any] | None = None,
        outbox: bool = False,
        *,
        signal: int = 0,
        sender: Frozen = None,
        kwargs: Frozen = None,
        text: str | None = None,
        trace: str | None = None,
    ) -> None:
        self.handler = handler
        self.id = id
        self.outbox = outbox
        self.batch: Batch | None = None
        #: The body as given (relayed, replayed, coalesced calls); None for a signal's call,
        #: kept as the index of the signal among the handler's and its frozen arguments.
        self.stored = body
        #: The JSON of ``body``, as kombu's encoder writes it, when known (a relayed call's
        #: stored text): the message carries it instead of encoding the body again.
        self.text = text
        #: A relayed call's kept trace (:mod:`propagation`), to publish it in; None mostly.
        self.trace = trace
        self.signal = signal
        self.sender = sender
        self.kwargs = kwargs
        #: When the transaction committed (set at flush).
        self.at: float | None = None
        #: Another database whose open transaction must commit too before the call goes
        #: (a custom signal's ``instance`` written there): see :func:`_wait_for`.
        self.after: str | None = None

    @property
    def body(self) -> dict[str, Any]:
        if self.stored is not None:
            return self.stored
        body = {
            "v": MESSAGE_VERSION,
            "signal": self.signal,
            "sender": thaw(self.sender),
            "kwargs": thaw(self.kwargs),
        }
        if self.at is not None:
            body["at"] = self.at
        return body

    def stamp(self, committed_at: float) -> None:
        """The transaction committed at ``committed_at``: the body says so from now on."""
        self.at = committed_at
        if self.stored is not None:
            self.stored["at"] = committed_at
            self.text = None

    def __call__(self) -> None:
        """Django runs this at commit (or a test's ``captureOnCommitCallbacks`` does)."""
        assert self.batch is not None
        _guarded(self.batch.release, self)

    def take(self) -> tuple[list[PendingCall], str] | None:
        batch = self.batch
        if batch is None:
            return None
        calls = batch.take(self)
        return (calls, batch.using) if calls else None

    def __repr__(self) -> str:
        return f"<deferred call {self.handler.name} [{self.id}]>"


def _guarded(release: Callable[..., object], *args: Any) -> None:
    """``release(*args)`` in a commit hook: an error is logged, never raised to Django, but
    a handler's own with ``EAGER_PROPAGATES`` or Celery's ``task_eager_propagates`` (tests
    asked for it). Django's robust ``on_commit`` logs ``func.__qualname__``, which an instance
    lacks, so the request would fail on an AttributeError instead."""
    try:
        release(*args)
    except Exception as error:
        if conf.eager_propagates or getattr(error, HANDLER_FAILED, False):
            raise
        logger.exception("deferred_signals: handing committed calls over failed")


def robust() -> bool:
    """Whether the package's commit hooks go in Django's ``on_commit`` as robust: not when a
    test asked for handlers' exceptions (which Django's robust hooks would log and swallow)."""
    return not (conf.eager_propagates or publisher.eager_propagates())


class Batch:
    """Consecutive calls of one transaction that share a savepoint context, hence a fate.

    At commit Django runs their callbacks in order: the first one publishes the whole batch.
    ``captureOnCommitCallbacks(execute=True)`` runs only the callbacks registered inside it:
    each publishes from its own call on, so calls made before the capture stay pending, as
    Django's own callbacks do. ``end``: calls from there on are already released.
    """

    __slots__ = ("calls", "end", "open", "robust", "using")

    def __init__(self, using: str) -> None:
        self.calls: list[PendingCall] = []
        self.end = 0
        self.open = True
        self.using = using
        #: Whether its callbacks go in as robust (:func:`robust`): read once per batch.
        self.robust = robust()

    def add(self, call: PendingCall) -> None:
        call.batch = self
        self.calls.append(call)
        self.end = len(self.calls)

    def release(self, call: PendingCall) -> None:
        released = self.take(call)
        if released:
            flush(released, self.using)

    def take(self, call: PendingCall) -> list[PendingCall]:
        """The calls ``call``'s callback hands over: from it to the end of the batch's
        pending calls; none if an earlier callback of the batch took them already."""
        self.open = False  # later calls start a batch of their own
        calls = self.calls
        # A call does not keep its index (an int object per call): the first callback to
        # run is the batch's first call, but under a test's capture of later callbacks.
        if self.end and calls[0] is call:
            index = 0
        else:
            try:
                index = calls.index(call, 0, self.end)
            except ValueError:
                return []  # released already, with an earlier callback of the batch
        released = calls[index : self.end]
        self.end = index
        if index == 0:
            self.calls = []  # everything is out: let the encoded calls go
        return released


def enqueue(call: PendingCall, using: str) -> None:
    """Send ``call`` when the transaction open on ``using`` commits (at once outside one)."""
    connection = transaction.get_connection(using)
    batch = _open_batch(connection)
    if batch is None:
        batch = Batch(using)
        if connection.in_atomic_block:
            from . import commit_guard  # which knows this module's hooks

            commit_guard.ensure(connection)  # before the outbox row: it counts callbacks
    if call.outbox and not conf.eager:
        outbox.write(call, using)  # raises OutboxWriteError, naming the handler and the fix
    batch.add(call)
    connection.on_commit(call, robust=batch.robust)


def _open_batch(connection: Any) -> Batch | None:
    if not (connection.in_atomic_block and connection.run_on_commit):
        return None
    sids, last, _robust = connection.run_on_commit[-1]
    if type(last) is not PendingCall or last.batch is None or not last.batch.open:
        return None
    # Same savepoints (None marks an atomic block without one) means the same fate.
    if sids - {None} != set(connection.savepoint_ids) - {None}:
        return None
    return last.batch


#: Set once a call has had to wait for a second database (``PendingCall.after``): until
#: then, flushing does not even look.
waiting = False


def in_transaction(connection: Any) -> bool:
    """A transaction that will commit is open on ``connection``: an atomic block, but not
    only a ``TestCase``'s never-committing ones (the test's own level, its autocommit)."""
    if not connection.in_atomic_block:
        return False
    from .testing import _at_test_level

    return not _at_test_level(connection)


def _wait_for(calls: list[PendingCall], using: str) -> list[PendingCall]:
    """The calls that may go now; each of the others goes when the transaction still open on
    its ``after`` database commits (and never if it rolls back)."""
    now: list[PendingCall] = []
    later: dict[str, list[PendingCall]] = {}
    for call in calls:
        after = call.after
        if after is not None and in_transaction(transaction.get_connection(after)):
            later.setdefault(after, []).append(call)
        else:
            now.append(call)
    for alias, held in later.items():
        for call in held:
            call.after = None
        # At the level of that whole transaction (no savepoint id, as coalescing's finisher):
        # both commits happened once it commits, whatever savepoint of it rolls back since.
        connection = transaction.get_connection(alias)
        from . import commit_guard

        commit_guard.ensure(connection)
        connection.run_on_commit.append((set(), _Held(held, using), robust()))
    return now


class _Held:
    """Calls waiting for a second database's commit: flushed by its ``on_commit``."""

    __slots__ = ("calls", "using")

    def __init__(self, calls: list[PendingCall], using: str) -> None:
        self.calls, self.using = calls, using

    def __call__(self) -> None:
        calls, self.calls = self.calls, []
        if calls:
            _guarded(flush, calls, self.using)

    def take(self) -> tuple[list[PendingCall], str] | None:
        calls, self.calls = self.calls, []
        return (calls, self.using) if calls else None

    def __repr__(self) -> str:
        return f"<deferred calls waiting for a second commit: {len(self.calls)}>"


#: Calls of one commit refused one by one (each costs a new connection) before the rest is
#: spilled without another try.
REFUSALS_PER_FLUSH = 1


def flush(calls: list[PendingCall], using: str) -> list[PendingCall]:
    """Hand committed calls over: to the broker, or inline with ``EAGER``.

    Returns the calls lost: neither the broker nor the outbox took them (logged). Never
    raises, but for a handler's own exception with ``EAGER_PROPAGATES``: the data is
    committed already, so a broker failure must not reach the request. A ``BaseException``
    that is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``, gevent's ``Timeout``)
    goes on up once the calls the broker had not confirmed are spilled.
    """
    if waiting and capture is None:
        calls = _wait_for(calls, using)
        if not calls:
            return []
    committed_at = time.time()
    for call in calls:
        call.stamp(committed_at)
    if capture is not None:
        capture(calls, using)
        return []
    if conf.eager:
        run_inline(calls)
        return []
    lost: list[PendingCall] = []
    # One PUBLISH_TIMEOUT for the commit, not one per attempt (invariant 8).
    deadline = time.monotonic() + conf.publish_timeout
    for attempt in range(REFUSALS_PER_FLUSH + 1):
        if attempt and time.monotonic() >= deadline:
            ran_out = PublishTimeout(
                f"PUBLISH_TIMEOUT ({conf.publish_timeout} s) ran out before the calls after "
                "a refused one could be published",
                broker_answering=True,
            )
            return lost + spill.spill(calls, using, ran_out)
        try:
            confirmed, error = publisher.publish(calls, deadline)
        except BaseException as interruption:
            spill.interrupted(calls, using, interruption)
            raise
        done, failed = publisher.taken(calls, confirmed, error)
        published = [call.id for call in done if call.outbox]
        if published:
            outbox.delete(published, using)
        if not failed:
            if error is not None and getattr(error, HANDLER_FAILED, False):
                # Celery's task_always_eager with task_eager_propagates: every call ran (the
                # failing one is a dead letter already, not to be spilled and run again) and
                # its outbox rows are gone; the test asked for the handler's exception.
                raise error
            return lost
        # One call refused (its queue, its message) or failing on our side: it and the
        # unconfirmed ones before it go to the outbox, the calls after it go on.
        blamed = publisher.faulty_call(error)
        at = next((n for n, call in enumerate(failed) if call.id == blamed), None)
        if at is None or attempt == REFUSALS_PER_FLUSH:
            break
        lost += spill.spill(failed[: at + 1], using, error)
        calls = failed[at + 1 :]
        if not calls:
            return lost
    return lost + spill.spill(failed, using, error)


def run_inline(calls: list[PendingCall]) -> None:
    """``EAGER``: run each call here, through kombu's JSON encode/decode, as a worker would.

    With ``EAGER_PROPAGATES`` the first handler's exception is raised once every call has
    run, as the worker would run them all: a failing handler does not take the calls after
    it with it."""
    first: Exception | None = None
    for call in calls:
        try:
            body = kombu_json.loads(kombu_json.dumps(call.body))
            decode_call(call.handler, body).run(call.id)
        except Exception as error:
            if conf.eager_propagates:
                if first is None:
                    first = error
                continue
            # The exception's text may quote the call's arguments: the traceback at DEBUG.
            name, kind = call.handler.name, type(error).__name__
            logger.error("Deferred handler %s failed (EAGER) [%s]: %s", name, call.id, kind)
            logger.debug("Deferred handler %s failed (EAGER) [%s]", name, call.id, exc_info=error)
    if first is not None:
        raise first
