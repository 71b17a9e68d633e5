"""Your ``on_commit`` callback raises at commit: the deferred calls after it are not lost.

Django runs a commit's callbacks in order, from a list of its own, and the first one to
raise what it does not catch (any exception from a callback registered without
``robust=True``, which is Django's default; a ``KeyboardInterrupt``, ``SystemExit`` or
gevent ``Timeout`` from any) stops it: the callbacks after it are dropped, the package's
with them, and their calls, committed, would be neither published nor spilled.

So before a hook of ours joins a transaction's callbacks, each callback of others
registered since our previous hook (every one, for the first) is wrapped in place in a
:class:`Guard` (:func:`ensure`): every callback that stands before a hook of ours is guarded,
and nothing is added to the list. A guard whose callback raises what stops the loop hands
the calls of our hooks still in that list over first (published, else spilled; spilled at
once for a ``BaseException``, which cuts the process short), then lets the exception go on,
the same object. Django's semantics are otherwise untouched: a robust callback's exception
is logged by Django (under the callback's name) and the loop goes on; the callbacks after
one that stops it are dropped. A guard compares equal to its callback and reads its
attributes through; only ``is`` tells them apart.

Nothing is wrapped in a ``TestCase``, whose transaction never commits: test captures
(Django's ``captureOnCommitCallbacks``, :mod:`~deferred_signals.testing`) see what they saw.
Entries are only ever replaced in place, never inserted nor added: a capture counting from
an index, or counting its callbacks, coalescing's and the outbox buffer's indices, all stay
right.
"""

from __future__ import annotations

import contextlib
import logging
import sys
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


def ensure(connection: Any) -> None:
    """A hook of ours joins the transaction open on ``connection`` next: wrap, in place, the
    callbacks of others registered since our last hook (all of them, for the first), which
    stand before it. Called once per batch (and per coalesced call, and for calls that
    waited for a second database), before the call's outbox row is written (the outbox
    buffer counts the callbacks registered before it). Looks back only as far as the last
    callback of ours: nothing at all when ours is the last one, as it is within a batch."""
    blocks = connection.atomic_blocks
    if not blocks or getattr(blocks[0], "_from_testcase", False):
        return  # a TestCase's transaction: it never commits
    callbacks = connection.run_on_commit
    for index in range(len(callbacks) - 1, -1, -1):
        sids, func, robust = callbacks[index]
        if _ours(func):
            return  # a hook of ours, or a callback wrapped already: the rest was seen
        callbacks[index] = (sids, Guard(func, robust), robust)


def _ours(func: Any) -> bool:
    return isinstance(func, _OURS)


def _hooks(func: Any) -> bool:
    return isinstance(func, _HOOKS)


#: The package's commit hooks (which hand calls over), and all of its commit callbacks.
_HOOKS = (dispatch.CommitHook, dispatch._Held)
_OURS = (*_HOOKS, Guard)


def _commit_callbacks(frame: FrameType) -> list[Any] | None:
    """The callbacks not run yet of the commit whose loop is ``frame``; None if ``frame`` is
    not Django's commit loop (a test's capture runs the callback)."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    if frame.f_code is not BaseDatabaseWrapper.run_and_clear_commit_hooks.__code__:
        return None
    callbacks = frame.f_locals.get("current_run_on_commit")
    return callbacks if isinstance(callbacks, list) else None


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
