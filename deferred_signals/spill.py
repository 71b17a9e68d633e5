"""Committed calls the broker did not take, written to the outbox for the relay (spilled).

:func:`spill` writes them (calls of ``delivery="outbox"`` handlers are there already: made due
at once) and logs one line per call, the broker's error quoted when the broker is to blame.
A ``BaseException`` that cuts a commit's publish short (:func:`interrupted`) spills the
calls the broker had not confirmed, and those of the commit's hooks Django then drops.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from . import broker, outbox, publisher, signals
from .exceptions import BrokerUnavailable
from .messages import summary

if TYPE_CHECKING:
    from .dispatch import PendingCall

logger = logging.getLogger("deferred_signals")


def interrupted(calls: list[PendingCall], using: str, interruption: BaseException) -> None:
    """A ``KeyboardInterrupt``, ``SystemExit`` or gevent ``Timeout`` cut the publish short,
    after the commit: every call the broker had not confirmed goes to the outbox before it goes
    on up, or nothing would ever publish them. The broker may hold some of them too (at least
    once)."""
    done = publisher.published_before(interruption)
    outbox.delete([call.id for call in calls[:done] if call.outbox], using)
    if calls[done:]:
        spill(calls[done:], using, interruption)
    try:
        spill_rest_of_commit(interruption)
    except Exception:  # the interruption goes on up all the same
        logger.exception("deferred_signals: spilling the rest of an interrupted commit failed")


def spill_rest_of_commit(interruption: BaseException) -> None:
    """Spill the calls of the commit callbacks Django has not run yet, which it drops as
    ``interruption`` goes on up through it: the commit's other batches (another savepoint
    context), coalesced calls, calls that waited for this commit on a second database. The
    user's own callbacks are dropped all the same: nothing can run them."""
    spill_taken(take_rest(unrun_commit_callbacks()), interruption)


def take_rest(commits: list[list[Any]]) -> dict[str, list[PendingCall]]:
    """The calls of the package's hooks among the callbacks of ``commits``, per database, in
    order, taken from the hooks (they hand nothing over after)."""
    from . import dispatch  # which holds the commit hooks, and calls this

    rest: dict[str, list[PendingCall]] = {}
    for callbacks in commits:
        for _sids, func, _robust in list(callbacks):
            hook = isinstance(func, (dispatch.CommitHook, dispatch._Held))
            if hook and (taken := func.take()) is not None:
                calls, using = taken
                rest.setdefault(using, []).extend(calls)
    return rest


def spill_taken(rest: dict[str, list[PendingCall]], interruption: BaseException) -> None:
    """Spill calls taken from their hooks (:func:`take_rest`), committed now."""
    from . import dispatch

    for using, calls in rest.items():
        if dispatch.waiting:
            calls = dispatch._wait_for(calls, using)
        committed_at = time.time()
        for call in calls:
            call.stamp(committed_at)
        if calls:
            spill(calls, using, interruption)


def unrun_commit_callbacks() -> list[list[Any]]:
    """The callbacks not run yet of each commit running on this thread's stack (innermost
    first): Django's ``run_and_clear_commit_hooks`` pops them from a list of its own, which
    only its frame holds. None found (another Django): nothing to spill."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    code = BaseDatabaseWrapper.run_and_clear_commit_hooks.__code__
    found = []
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            callbacks = frame.f_locals.get("current_run_on_commit")
            if isinstance(callbacks, list):
                found.append(callbacks)
        frame = frame.f_back  # type: ignore[assignment]
    return found


#: Longest error text quoted on a spilled call's line.
REASON_LENGTH = 300


def spill(calls: list[PendingCall], using: str, error: BaseException | None) -> list[PendingCall]:
    cooling = isinstance(error, BrokerUnavailable)
    # A broker down, refusing or too slow is no bug: each call's line says what it answered,
    # and kombu's traceback (some 20 frames, for each commit that tries it during an outage)
    # goes to DEBUG. Anything else is a bug to find: its traceback at WARNING. Once per
    # failure either way, not once per call.
    expected = isinstance(error, Exception) and broker.is_broker_failure(error)
    if cooling:
        reason = "broker cooling down"
    elif expected:
        reason = f"{type(error).__name__}: {error}"[:REASON_LENGTH]
    else:  # the text of a bug's exception may quote the call's arguments
        reason = type(error).__name__
    if not cooling:
        logger.log(
            logging.DEBUG if expected else logging.WARNING,
            "deferred_signals could not publish %d committed call(s); they go to the outbox "
            "of database %r for the relay",
            len(calls),
            using,
            exc_info=error,
        )
    spilled = outbox.spill([call for call in calls if not call.outbox], using, error)
    outbox.make_due([call.id for call in calls if call.outbox], using, error)
    for call in calls:
        fate = "kept in the outbox" if call.outbox else "spilled" if spilled else "LOST"
        logger.warning(
            "deferred_signals %s: %s [%s] (%s): %s",
            fate,
            call.handler.name,
            call.id,
            summary(call.body),
            reason,
        )
        lost = not (call.outbox or spilled)
        signal = signals.call_lost if lost else signals.call_spilled
        if signal.receivers:
            signal.send(call.handler.func, handler=call.handler.name, call_id=call.id, error=error)
    return [] if spilled else [call for call in calls if not call.outbox]
