"""Your ``on_commit`` callback raises at commit: the deferred calls after it are not lost.

Django runs a commit's callbacks in order, from a list of its own, and the first one to
raise what it does not catch (any exception from a callback registered without
``robust=True``, which is Django's default; a ``KeyboardInterrupt``, ``SystemExit`` or
gevent ``Timeout`` from any) stops it: the callbacks after it are dropped, the package's
with them, and their calls, committed, would be neither published nor spilled.

So a transaction's first hook of ours is preceded by a :class:`Guardian`, registered for the
whole transaction (no savepoint id: only the transaction's rollback drops it). Callbacks of
others registered before it are wrapped in place, then, in a :class:`Guard`; those registered
after it, at commit: it runs before them, and wraps in Django's list each one that stands
before a hook of ours. A guard whose callback raises what stops the loop hands the calls of
our hooks still in that list over first (published, else spilled; spilled at once for a
``BaseException``, which cuts the process short), then lets the exception go on, the same
object. Django's semantics are otherwise untouched: a robust callback's exception is logged
by Django (under the callback's name) and the loop goes on; the callbacks after one that
stops it are dropped.

Nothing is registered in a ``TestCase``, whose transaction never commits: test captures
(Django's ``captureOnCommitCallbacks``, :mod:`~deferred_signals.testing`) see what they saw.
Entries are only ever replaced in place or appended, never inserted: a capture counting from
an index, coalescing's and the outbox buffer's indices, all stay right.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from types import FrameType
from typing import Any

import django

from . import dispatch, spill

logger = logging.getLogger("deferred_signals")

#: Django before 6.1 logs a robust callback's exception with ``func.__qualname__``, and a
#: callable without one (a ``functools.partial``) makes that logging raise: the loop stops.
_NAME_REQUIRED = django.VERSION < (6, 1)


class Guard:
    """A callback of yours, guarded: to Django (its log of a robust callback's failure, a
    test's capture running it) it looks like the callback, and runs it."""

    def __init__(self, func: Any, robust: bool) -> None:
        self._ds_func = func
        self._ds_robust = robust
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            # One the callback lacks, the guard lacks: Django < 6.1 fails naming either.
            with contextlib.suppress(AttributeError):
                setattr(self, name, getattr(func, name))
        self.__wrapped__ = func

    def __call__(self) -> None:
        try:
            self._ds_func()
        except BaseException as error:
            if self._stops_commit(error):
                try:
                    _hand_over(sys._getframe(1), error)
                except Exception:
                    logger.exception(
                        "deferred_signals: handing over the calls of a commit stopped by an "
                        "on_commit callback failed"
                    )
            raise

    def _stops_commit(self, error: BaseException) -> bool:
        """Does ``error`` stop Django's loop? (A robust callback's ``Exception`` is logged.)"""
        if not self._ds_robust or not isinstance(error, Exception):
            return True
        return _NAME_REQUIRED and not hasattr(self, "__qualname__")

    def __getattr__(self, name: str) -> Any:
        # A test reads your callback off the list: a partial's ``func``, a method's ``__self__``.
        if name.startswith("_ds_"):
            raise AttributeError(name)
        return getattr(self._ds_func, name)

    def __eq__(self, other: object) -> bool:
        # ``func in run_on_commit`` (register once), ``captured == [obj.method]``: a bound
        # method is a new object on each read, so it is compared, never identical.
        if isinstance(other, Guard):
            other = other._ds_func
        return bool(self._ds_func == other)

    def __hash__(self) -> int:
        return hash(self._ds_func)

    def __str__(self) -> str:  # Django >= 6.1 logs a callable without __qualname__ so
        return str(self._ds_func)

    def __repr__(self) -> str:
        return f"<deferred_signals guard of {self._ds_func!r}>"


class Guardian:
    """Registered ahead of a transaction's hooks of ours: guards, at commit, the callbacks of
    others registered after it that stand before a hook of ours."""

    __slots__ = ("foreign", "index")

    def __init__(self, index: int) -> None:
        #: Where it was registered; it can only move toward the front since.
        self.index = index
        #: A callback of others was registered after it, before a hook of ours.
        self.foreign = False

    def __call__(self) -> None:
        if not self.foreign:
            return
        try:
            callbacks = _commit_callbacks(sys._getframe(1))
            if callbacks is not None:  # else a test's capture runs it: no commit to guard
                _guard(callbacks)
        except Exception:  # never raises: robust, and Django < 6.1 cannot name it
            logger.exception("deferred_signals: guarding a commit's callbacks failed")

    def __repr__(self) -> str:
        return "<deferred_signals commit guardian>"


_guardians: weakref.WeakKeyDictionary[Any, Guardian] = weakref.WeakKeyDictionary()


def ensure(connection: Any) -> None:
    """A hook of ours joins the transaction open on ``connection`` next: a guardian must
    stand ahead of it. Called once per batch (and per coalesced call), before the call's
    outbox row is written (the outbox buffer counts the callbacks registered before it)."""
    blocks = connection.atomic_blocks
    if not blocks or getattr(blocks[0], "_from_testcase", False):
        return  # a TestCase's transaction: it never commits
    callbacks = connection.run_on_commit
    guardian = _guardians.get(connection)
    if guardian is not None and _pending(callbacks, guardian):
        if not _ours(callbacks[-1][1]):
            guardian.foreign = True
        return
    for index, (sids, func, robust) in enumerate(callbacks):
        if not _ours(func):
            callbacks[index] = (sids, Guard(func, robust), robust)
    guardian = _guardians[connection] = Guardian(len(callbacks))
    callbacks.append((set(), guardian, True))


def _pending(callbacks: list[Any], guardian: Guardian) -> bool:
    """Is ``guardian`` among ``callbacks`` (else another transaction's, or rolled back)?"""
    start = min(guardian.index, len(callbacks) - 1)
    if start >= 0 and callbacks[start][1] is guardian:
        return True  # where it was registered: no savepoint rolled back before it
    for index in range(start - 1, -1, -1):
        if callbacks[index][1] is guardian:
            guardian.index = index  # moved forward by a savepoint rollback: look there next
            return True
    return False


def _ours(func: Any) -> bool:
    return isinstance(func, _OURS)


def _hooks(func: Any) -> bool:
    return isinstance(func, _HOOKS)


#: The package's commit hooks (which hand calls over), and all of its commit callbacks.
_HOOKS = (dispatch.CommitHook, dispatch._Held)
_OURS = (*_HOOKS, Guardian, Guard)


def _commit_callbacks(frame: FrameType) -> list[Any] | None:
    """The callbacks not run yet of the commit whose loop is ``frame``; None if ``frame`` is
    not Django's commit loop (a test's capture runs the callback)."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    if frame.f_code is not BaseDatabaseWrapper.run_and_clear_commit_hooks.__code__:
        return None
    callbacks = frame.f_locals.get("current_run_on_commit")
    return callbacks if isinstance(callbacks, list) else None


def _guard(callbacks: list[Any]) -> None:
    """Wrap the callbacks of others that stand before the last hook of ours."""
    last = next((i for i in range(len(callbacks) - 1, -1, -1) if _hooks(callbacks[i][1])), 0)
    for index in range(last):
        sids, func, robust = callbacks[index]
        if not _ours(func):
            callbacks[index] = (sids, Guard(func, robust), robust)


def _hand_over(frame: FrameType, error: BaseException) -> None:
    """The commit looping in ``frame`` stops on ``error``: hand over the calls of our hooks
    it would drop. An ``Exception`` leaves a process that works: they are published as at
    commit (within ``PUBLISH_TIMEOUT``, else spilled; ``EAGER`` and captures as usual). A
    ``BaseException`` cuts it short: they are spilled at once, with those of the commits
    it goes on up through."""
    callbacks = _commit_callbacks(frame)
    if callbacks is None:
        return  # a test's capture ran the callback: it drops nothing of ours
    if not isinstance(error, Exception):
        spill.spill_rest_of_commit(error)
        return
    rest = spill.take_rest([callbacks])
    if not rest:
        return
    logger.warning(
        "deferred_signals: an on_commit callback raised %s: the commit's %d deferred call(s) "
        "after it, which Django drops, are handed over first",
        type(error).__name__,
        sum(len(calls) for calls in rest.values()),
    )
    while rest:
        using, calls = next(iter(rest.items()))
        del rest[using]
        try:
            dispatch.flush(calls, using)
        except Exception:  # a handler's own, with EAGER_PROPAGATES: yours goes up
            logger.exception("deferred_signals: a deferred handler failed (EAGER)")
        except BaseException as interruption:  # spilled its calls; spill the others too
            spill.spill_taken(rest, interruption)
            raise
