"""Test deferred handlers without a broker: :func:`capture_deferred` (and pytest's ``deferred``).

While a capture is active, a deferred call that would be published is captured instead, as
its JSON message: ``capture.calls`` decodes it as a worker would, ``capture.run()`` runs it
here, through the same JSON round trip and decoder as a worker.

When does a call count? When its transaction commits, as in production. Django's
``TestCase`` (and pytest-django's ``db`` fixture) wraps each test in atomic blocks that never
commit, so there the capture treats those blocks as the database's own level, autocommit:

- a call made outside any atomic block of yours (a plain ``save()``, a custom ``send()``)
  counts at once;
- a call made inside your atomic blocks counts when your outermost block exits without
  rolling back; a rolled-back block or savepoint drops its calls, as a commit would;
- a ``coalesce=True`` handler's calls inside your blocks count as their merge, at that
  exit (the capture runs coalescing's own commit callbacks too); at the test's level, as in
  autocommit, each call counts on its own (``coalesce`` asks :func:`at_test_level`).

How: Django marks the atomic blocks a ``TestCase`` opens (``Atomic._from_testcase``, what
lets a ``durable`` block run inside a test). While capturing, :class:`~django.db.transaction.
Atomic`'s ``__enter__`` and ``__exit__`` are wrapped: when a block of yours is entered or
exited with only test blocks left open, the deferred calls still waiting in the connection's
``on_commit`` list are either run as Django would run them at commit (so they reach
:func:`dispatch.flush`, which hands them to the capture) or, after a rollback, forgotten.
Django itself removes the callbacks of a rolled-back savepoint; a block without a savepoint
that fails leaves the transaction marked for rollback, which the exit sees. Entering a
block counts the test-level calls before it: dispatch batches a call with those of a
following block without savepoint (one fate in production), which must not drop it here.
Reading the capture (``calls``, the assertions, ``run()``) and leaving it count the calls
made at the test's level since. Under ``TransactionTestCase`` or ``transactional_db`` nothing
is wrapped in a test block: calls count at the real commit, through Django's ``on_commit``.

Limits: calls made before the capture started are not captured, nor calls whose outermost
block is still open when the capture ends (start and end it at the test's level). Only one
capture at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress
from types import TracebackType
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.transaction import Atomic
from django.dispatch import Signal
from kombu.utils import json as kombu_json

from . import dispatch, outbox, registry
from .decoder import resolve
from .dispatch import CommitHook, PendingCall
from .exceptions import DeferredSignalError
from .execution import decode_call

__all__ = ["CapturedCall", "DeferredCapture", "capture_deferred"]

#: The active capture, if any; its Atomic wrappers and the flush hook serve it.
_active: DeferredCapture | None = None
_atomic_enter = Atomic.__enter__
_atomic_exit = Atomic.__exit__


class CapturedCall:
    """A deferred call as a worker would receive it.

    ``handler`` is the handler's registered name and ``id`` the call id. ``signal``,
    ``sender`` and ``kwargs`` are decoded from the call's JSON message when first read, as a
    worker would decode them then: a ``fresh`` instance is read from the database, a snapshot
    rebuilt. A row deleted before that comes back as an unsaved instance holding only its pk
    (a worker would skip the call, or raise, per ``on_missing``).
    """

    def __init__(self, call: PendingCall) -> None:
        self.handler: str = call.handler.name
        self.id: str = call.id
        self._registered = call.handler
        #: The message's JSON, serialized as Celery would publish it.
        self.message: str = kombu_json.dumps(call.body)
        self._decoded: tuple[Signal, Any, dict[str, Any]] | None = None
        self._ran = False

    @property
    def signal(self) -> Signal:
        return self._decode()[0]

    @property
    def sender(self) -> Any:
        return self._decode()[1]

    @property
    def kwargs(self) -> dict[str, Any]:
        return self._decode()[2]

    def _decode(self) -> tuple[Signal, Any, dict[str, Any]]:
        if self._decoded is None:
            decoded = decode_call(self._registered, kombu_json.loads(self.message))
            # The worker's own lookup: fresh rows, snapshots, ``on_missing`` ("raise" raises).
            # It logs nothing: reading the arguments skips no call, run() does.
            with suppress(ObjectDoesNotExist):
                decoded._resolve_instances()
            for ref in decoded.decoder.instances:
                if ref.resolved is None:
                    ref.resolved = ref.model(pk=ref.pk)
            self._decoded = (decoded.signal, resolve(decoded.sender), resolve(decoded.kwargs))
        return self._decoded

    def _run(self) -> None:
        self._ran = True
        decode_call(self._registered, kombu_json.loads(self.message)).run(self.id)

    def describe(self) -> str:
        """``handler(sender=..., name=value, ...)``, for assertion messages."""
        try:
            arguments = {"sender": self.sender, **self.kwargs}
        except Exception as error:  # a broken test transaction, a missing model...
            return f"{self.handler}({self.message}) (not decodable here: {error!r})"
        shown = ", ".join(f"{name}={value!r}" for name, value in arguments.items())
        return f"{self.handler}({shown})"

    def __repr__(self) -> str:
        return f"<CapturedCall {self.handler} [{self.id}]>"


class DeferredCapture:
    """Deferred calls captured instead of published; use it through :func:`capture_deferred`
    or pytest's ``deferred`` fixture."""

    def __init__(self) -> None:
        self._calls: list[CapturedCall] = []
        #: Calls captured, and calls this capture will never count (made before it started,
        #: rolled back, or released outside it): each pending call is looked at once.
        self._taken: set[Callable[[], None]] = set()
        self._passed: set[Callable[[], None]] = set()

    # --- what tests use ------------------------------------------------------------------

    @property
    def calls(self) -> list[CapturedCall]:
        """Every call captured so far, in the order their transactions released them."""
        _refuse_async_context()
        self._take_test_level()
        return list(self._calls)

    def assert_deferred(
        self, handler: str | Callable[..., Any], /, **expected: Any
    ) -> CapturedCall:
        """Assert ``handler`` (the function or its registered name) was deferred, and return
        its first call whose arguments include ``expected`` (``sender`` and ``signal`` too).
        """
        name = _handler_name(handler)
        for call in self.calls:
            if call.handler == name and _matches(call, expected):
                return call
        wanted = ", ".join(f"{key}={value!r}" for key, value in expected.items())
        raise AssertionError(
            f"No deferred call of {name}{f' with {wanted}' if wanted else ''}. " + self._instead()
        )

    def assert_not_deferred(self, handler: str | Callable[..., Any], /) -> None:
        """Assert ``handler`` (the function or its registered name) was not deferred."""
        name = _handler_name(handler)
        found = [call for call in self.calls if call.handler == name]
        if found:
            raise AssertionError(
                f"{name} was deferred {len(found)} time(s), expected never. " + self._instead()
            )

    def run(self) -> list[CapturedCall]:
        """Run the captured calls that have not run yet, here, and return them.

        Each goes through the same JSON round trip and decoding as on a worker (fresh rows
        are read now); a handler's exception propagates. Calls the handlers defer in turn are
        captured, for the next ``run()``.
        """
        todo = [call for call in self.calls if not call._ran]
        for call in todo:
            call._run()
        return todo

    def _instead(self) -> str:
        if not self._calls:
            return "Nothing was deferred."
        listed = "\n".join(f"  - {call.describe()}" for call in self._calls)
        return f"Deferred instead:\n{listed}"

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        global _active
        _refuse_async_context()
        if _active is not None:
            raise DeferredSignalError(
                "Deferred calls are already being captured (the `deferred` fixture or another "
                "capture_deferred()): use that capture."
            )
        for connection in connections.all(initialized_only=True):
            self._passed.update(_pending(connection))
        _active = self
        dispatch.capture = self._record
        Atomic.__enter__ = _enter  # type: ignore[method-assign]
        Atomic.__exit__ = _exit  # type: ignore[method-assign]

    def stop(self) -> None:
        global _active
        if _active is not self:
            return
        asynchronous = _in_async_context()
        try:
            if not asynchronous:
                self._take_test_level()
        finally:
            _active = None
            dispatch.capture = None
            Atomic.__enter__ = _atomic_enter  # type: ignore[method-assign]
            Atomic.__exit__ = _atomic_exit  # type: ignore[method-assign]
        if asynchronous:  # stopped all the same: the next test must not find it active
            _refuse_async_context()

    def __enter__(self) -> DeferredCapture:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the mechanism (see the module's docstring) -------------------------------------

    def _record(self, calls: list[PendingCall], using: str) -> None:
        """dispatch.flush()'s hook: these calls are committed."""
        # Each call comes here once: its batch releases it once.
        self._taken.update(calls)
        self._calls.extend(CapturedCall(call) for call in calls)
        written = [call.id for call in calls if call.outbox]
        if written and not transaction.get_connection(using).needs_rollback:
            outbox.delete(written, using)  # captured, not to be relayed

    def _take_test_level(self) -> None:
        if _active is self:
            for connection in connections.all(initialized_only=True):
                if _at_test_level(connection):
                    self._take(connection)

    def _take(self, connection: BaseDatabaseWrapper) -> None:
        for callback in _pending(connection):
            if callback not in self._taken and callback not in self._passed:
                if type(callback) is not PendingCall:
                    self._taken.add(callback)  # coalescing's, a replay's: _record sees their calls
                # As Django would at commit: a batch, or the merge of coalesced calls, goes
                # to flush(), then to _record.
                callback()

    def _forget(self, connection: BaseDatabaseWrapper) -> None:
        self._passed.update(call for call in _pending(connection) if call not in self._taken)


def capture_deferred() -> DeferredCapture:
    """Capture deferred calls instead of publishing them, for ``unittest`` and Django tests.

    ::

        with capture_deferred() as deferred:
            Article.objects.create(title="Hello")
        deferred.assert_deferred(article_saved, created=True)
        deferred.run()  # runs the handlers here, as a worker would

    In a ``TestCase`` (whose transaction never commits) a call counts when made outside your
    atomic blocks, or when your outermost atomic block exits without rolling back; elsewhere,
    when its transaction commits. Rolled-back calls never count. pytest users: the
    ``deferred`` fixture is the same object.
    """
    return DeferredCapture()


def _in_async_context() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _refuse_async_context() -> None:
    """The capture counts the calls waiting on the connections it can see, and Django's
    connections are per thread, and per context in async code. In an ``async def`` test
    (Django runs it in an event loop thread of its own) the ORM runs through
    ``sync_to_async`` on the test's thread; even in that thread a loop sees other
    connections. Read from a loop, the calls made at the test's level would be missing, and
    ``assert_not_deferred`` would pass whatever was deferred."""
    if _in_async_context():
        raise DeferredSignalError(
            "capture_deferred() used from an async context (an `async def` test): its calls "
            "wait on the database connection of the thread that runs the ORM, not this one. "
            "Start and stop the capture in synchronous code (the `deferred` fixture, setUp) "
            "and read it through sync_to_async, e.g. "
            "`await sync_to_async(deferred.assert_deferred)(handler)`."
        )


def _pending(connection: BaseDatabaseWrapper) -> list[Callable[[], None]]:
    """The package's commit callbacks (:class:`~deferred_signals.dispatch.CommitHook`), in
    order: calls, coalesced calls' own (each marks its call as surviving; the last finisher
    releases the merged calls), and replays made inside a transaction."""
    # Entries are (savepoint ids, callback, robust); django-stubs still says pairs.
    callbacks = (entry[1] for entry in connection.run_on_commit)
    return [func for func in callbacks if isinstance(func, CommitHook)]


def at_test_level(connection: BaseDatabaseWrapper) -> bool:
    """Is a capture active and only a ``TestCase``'s never-committing blocks open on
    ``connection`` (the test's own level, its autocommit)?"""
    return _active is not None and _at_test_level(connection)


def _at_test_level(connection: BaseDatabaseWrapper) -> bool:
    """Only the never-committing blocks of a ``TestCase`` are open: the test's autocommit."""
    blocks = connection.atomic_blocks
    return bool(blocks) and all(_from_testcase(block) for block in blocks)


def _from_testcase(block: Atomic) -> bool:
    return bool(getattr(block, "_from_testcase", False))


def _enter(self: Atomic) -> None:
    capture = _active
    if capture is not None and not _from_testcase(self):
        connection = transaction.get_connection(self.using)
        if _at_test_level(connection):
            capture._take(connection)  # made at the test's level: committed already
    _atomic_enter(self)


def _exit(
    self: Atomic,
    exc_type: type[BaseException] | None,
    exc_value: BaseException | None,
    traceback: TracebackType | None,
) -> None:
    failed = True  # unless Django's exit returns: a failed savepoint release raises
    try:
        _atomic_exit(self, exc_type, exc_value, traceback)
        failed = exc_type is not None
    finally:
        _exited(self, failed)


def _exited(block: Atomic, failed: bool) -> None:
    capture = _active
    if capture is None or _from_testcase(block):
        return
    connection = transaction.get_connection(block.using)
    if not _at_test_level(connection):
        return  # an inner block, or a real transaction (its commit runs on_commit)
    # The outermost block of the test's own code: its "commit". A rolled-back savepoint
    # took its callbacks with it; a failed block without one marked the transaction.
    if failed or connection.needs_rollback:
        capture._forget(connection)
    else:
        capture._take(connection)


def _handler_name(handler: str | Callable[..., Any]) -> str:
    if isinstance(handler, str):
        found = registry.get(handler)
    else:
        # ``==``: a bound method read again is a new object, equal to the registered one.
        found = next((h for h in registry.all_handlers() if h.func == handler), None)
    if found is None:
        raise DeferredSignalError(
            f"{handler!r} is not a deferred handler: give the function connected with "
            "receiver(..., defer=True) or connect(..., defer=True), or its registered name."
        )
    return found.name


def _matches(call: CapturedCall, expected: dict[str, Any]) -> bool:
    arguments = {"signal": call.signal, "sender": call.sender, **call.kwargs}
    return all(key in arguments and arguments[key] == value for key, value in expected.items())
