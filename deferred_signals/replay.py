"""Replaying dead letters: the same message, the same call id, through the normal publish path."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.db import DatabaseError, router, transaction
from django.utils import timezone
from kombu.utils import json as kombu_json

from . import outbox, registry
from .conf import conf
from .dispatch import CommitHook, PendingCall, _guarded, flush, in_transaction, robust
from .tasks import MESSAGE_KEYS

if TYPE_CHECKING:
    from .models import DeadLetter

logger = logging.getLogger("deferred_signals")

#: Why a letter published again is not marked replayed.
LOST = "neither the broker nor the outbox took it (logged as LOST): still a dead letter"
#: Why a letter is not published: a claim found it changed since it was read.
TAKEN = "replayed by another replay, or failed again, since it was read: not published twice"
#: A lost call whose letter the database did not let this replay un-mark.
STUCK = (
    "neither the broker nor the outbox took it (logged as LOST), and un-marking it failed: "
    "it reads as replayed, replay it by its id"
)
#: Seconds before each new try of a claim the database refused; None: give up.
CLAIM_WAITS = (0.05, 0.2, None)
#: Letters claimed before their calls are published, at most (the relay's batch).
CLAIMS_PER_PUBLISH = 500
#: Why a letter is not published: its claim failed (the database refused or did not answer).
UNCLAIMED = "could not be claimed ({}): not published, still a dead letter"


@dataclass(frozen=True)
class Skipped:
    letter: DeadLetter
    reason: str


class Unreplayable(Exception):
    """A dead letter this process cannot publish again; the text says why."""


def replay(
    letters: Iterable[DeadLetter], dry_run: bool = False
) -> tuple[list[DeadLetter], list[Skipped]]:
    """Publish each dead letter's message again with its call id; mark it replayed.

    A letter whose handler is not registered in this process, or whose message does not
    decode or is not one this package could have sent (a refused, forged message), is
    skipped with the reason, and the others are replayed.

    Each letter is *claimed* before it is published: marked replayed, on the condition that
    nobody replayed it, and no worker recorded a new failure, since it was read. Two replays
    at once (two operators, the admin and the command) thus publish each letter once: the
    later one skips what the earlier one claimed. Inside a transaction (the admin under
    ``ATOMIC_REQUESTS``) the claims are that transaction's and the calls are published when it
    commits, never if it rolls back, as any deferred call.

    The claim and the call's outbox row commit together (as ``delivery="outbox"``), so a
    replay killed before the broker confirmed its publish leaves the call to the relay: the
    letter is marked replayed and its call published, or neither. The row is deleted once
    the broker confirms the message; what it does not confirm waits there for the relay.
    Calls are published as letters are claimed, every :data:`CLAIMS_PER_PUBLISH` claims or
    quarter of ``OUTBOX_GRACE``, before the relay may take their rows.
    Without a row (``EAGER``, or a transaction when the outbox is on another database) a
    letter whose call neither the broker nor the outbox took is un-marked: it stays a dead
    letter, reported skipped when published at once, logged when published at a commit.
    """

    chosen: list[tuple[DeadLetter, PendingCall]] = []
    skipped: list[Skipped] = []
    for letter in letters:
        try:
            chosen.append((letter, _call_of(letter)))
        except Unreplayable as error:
            skipped.append(_skip(letter, str(error)))
    if dry_run:
        return [letter for letter, _ in chosen], skipped
    now = timezone.now()
    replayed: list[DeadLetter] = []
    claimed: list[tuple[DeadLetter, PendingCall]] = []
    first_claim = 0.0
    for letter, call in chosen:
        using = _written_on(letter)
        kept = _keeps(using)
        try:
            taken = _claim_soon(letter, call, now, kept)
        except DatabaseError as error:
            if in_transaction(transaction.get_connection(using)):
                raise  # the transaction rolls back, claims and all: nothing is published
            # Autocommit: this letter's claim rolled back, it stays a dead letter.
            skipped.append(_skip(letter, UNCLAIMED.format(type(error).__name__)))
            continue
        if not taken:
            skipped.append(_skip(letter, TAKEN))
            continue
        call.outbox = kept
        if not claimed:
            first_claim = time.monotonic()
        claimed.append((letter, call))
        # A claimed call's outbox row is the relay's once OUTBOX_GRACE is over: publish
        # (and delete) it well before, not after claiming thousands of letters more.
        if (
            len(claimed) >= CLAIMS_PER_PUBLISH
            or time.monotonic() - first_claim >= conf.outbox_grace / 4
        ):
            replayed += _release(claimed, now, skipped)
            claimed = []
    if claimed:
        replayed += _release(claimed, now, skipped)
    return replayed, skipped


def _release(
    claimed: list[tuple[DeadLetter, PendingCall]], now: datetime.datetime, skipped: list[Skipped]
) -> list[DeadLetter]:
    """Publish the calls of ``claimed`` now, or at the commit of the transaction holding
    their claims; return the letters replayed, adding those lost to ``skipped``."""
    # The letters' write database (a router may read them from a replica): its open
    # transaction, if any, holds the claims.
    using = _written_on(claimed[0][0])
    if in_transaction(transaction.get_connection(using)):
        # Not robust with EAGER_PROPAGATES (or Celery's eager propagation), as a deferred
        # call's own callback: the handler's exception reaches the test.
        transaction.on_commit(ReplayAtCommit(claimed, now), using=using, robust=robust())
        return [letter for letter, _ in claimed]
    lost = _publish(claimed, now)
    skipped += [_skip(letter, LOST if letter.replayed_at is None else STUCK) for letter in lost]
    return [letter for letter, _ in claimed if letter not in lost]


class ReplayAtCommit(CommitHook):
    """The commit callback of a replay made inside a transaction: publishes its claimed
    letters' calls. A type of its own, so the testing capture runs it at a ``TestCase``
    block's exit, as it runs deferred calls' callbacks."""

    __slots__ = ("claimed", "now")

    def __init__(self, claimed: list[tuple[DeadLetter, PendingCall]], now: datetime.datetime):
        self.claimed, self.now = claimed, now

    def __call__(self) -> None:
        _guarded(_publish, self.claimed, self.now)

    def __repr__(self) -> str:
        return f"<replay of {len(self.claimed)} dead letter(s) at commit>"


def _keeps(using: str) -> bool:
    """Whether a claim on ``using`` writes its call's outbox row in the same transaction.

    Not with ``EAGER`` (the call runs here), nor inside a transaction of the letters'
    database when the outbox is on another one: the row would commit before that
    transaction, and be relayed even if it rolls back. Such a call is published at the
    commit, and un-marked if neither the broker nor the outbox takes it.
    """
    from .models import OutboxCall

    if conf.eager:
        return False
    return router.db_for_write(OutboxCall) == using or not in_transaction(
        transaction.get_connection(using)
    )


def _claim_soon(letter: DeadLetter, call: PendingCall, now: datetime.datetime, kept: bool) -> bool:
    """:func:`_claim`, tried again a little later when the database refused it in
    autocommit: a claim is a transaction of two writes, which a database that locks whole
    tables (SQLite) refuses while another replay's is open."""
    for wait in CLAIM_WAITS:
        try:
            return _claim(letter, call, now, kept)
        except DatabaseError:
            if wait is None or in_transaction(transaction.get_connection(_written_on(letter))):
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _claim(letter: DeadLetter, call: PendingCall, now: datetime.datetime, kept: bool) -> bool:
    """Mark ``letter`` replayed if it is still as read: replayed by nobody else since, and
    not failed again (a worker's new failure rewrites ``last_failed_at``).

    With ``kept``, the claim and the call's outbox row commit together: a process killed
    before its publish is confirmed leaves the call to the relay, never a letter marked
    replayed that nobody publishes. Raises what the database raised; the claim is then undone.
    """
    from .models import DeadLetter, OutboxCall

    using = _written_on(letter)
    rows = router.db_for_write(OutboxCall) if kept else using
    # Two databases: the outbox row commits first (the inner block), so a crash between the
    # two commits can cost a second run of the call, never the call.
    as_read = DeadLetter.objects.using(using).filter(
        pk=letter.pk, last_failed_at=letter.last_failed_at, replayed_at=letter.replayed_at
    )
    with transaction.atomic(using=using), transaction.atomic(using=rows):
        if not as_read.update(replayed_at=now):
            return False
        if kept:
            outbox.hold(call, rows)
    letter.replayed_at = now
    return True


def _publish(
    claimed: list[tuple[DeadLetter, PendingCall]], now: datetime.datetime
) -> list[DeadLetter]:
    """Publish the claimed letters' calls; un-mark and return the letters whose call was lost."""
    from .models import OutboxCall

    try:
        lost_ids = {
            call.id
            for call in flush([call for _, call in claimed], router.db_for_write(OutboxCall))
        }
    except BaseException:
        # A handler's own exception with EAGER_PROPAGATES: which calls ran is unknown, and
        # the one that raised failed again without a dead letter: un-mark them all.
        _unmark([letter for letter, _ in claimed], now)
        raise
    lost = [letter for letter, call in claimed if call.id in lost_ids]
    _unmark(lost, now)
    return lost


def _unmark(letters: list[DeadLetter], now: datetime.datetime) -> None:
    from .models import DeadLetter

    for letter in letters:
        # Only this replay's mark: a worker's new failure, if any, stands.
        try:
            DeadLetter.objects.using(_written_on(letter)).filter(
                pk=letter.pk, replayed_at=now
            ).update(replayed_at=None)
        except DatabaseError:
            logger.exception(
                "deferred_signals could not un-mark dead letter %s: %s [%s]: its call was not "
                "published, yet it stays marked replayed: replay it by its id",
                letter.pk,
                letter.handler,
                letter.call_id,
            )
            continue
        letter.replayed_at = None


def _written_on(letter: DeadLetter) -> str:
    """The database ``letter`` is written on: the router's, else the one it was read from."""
    from .models import DeadLetter

    return router.db_for_write(DeadLetter, instance=letter)


def _call_of(letter: DeadLetter) -> PendingCall:
    handler = registry.get(letter.handler)
    if handler is None:
        raise Unreplayable(f"no deferred handler is registered as {letter.handler!r}")
    try:
        body = kombu_json.loads(letter.body)
    except Exception as error:  # not only ValueError: too deep a body raises RecursionError
        # The type only: an exception's text may quote the message.
        raise Unreplayable(f"its message does not decode ({type(error).__name__})") from None
    if type(body) is not dict or not body.keys() >= MESSAGE_KEYS:
        raise Unreplayable("its message is not one this package sends")
    if type(body["kwargs"]) is not dict:
        raise Unreplayable("its message is not one this package sends")
    # A new delivery, from retry 0: a new database-outage window, and no outage retries to
    # set against its max_retries (they would give it as many extra retries). The worker's
    # letters hold neither (deadletters.WORKER_KEYS); a body edited or written by hand may.
    body.pop("dbf", None)
    body.pop("dbr", None)
    return PendingCall(handler, letter.call_id, body)


def _skip(letter: DeadLetter, reason: str) -> Skipped:
    logger.warning(
        "deferred_signals did not replay dead letter %s: %s [%s]: %s",
        letter.pk,
        letter.handler,
        letter.call_id,
        reason,
    )
    return Skipped(letter, reason)
