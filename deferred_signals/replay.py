"""Replaying dead letters: the same message, the same call id, through the normal publish path."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.db import router
from django.utils import timezone
from kombu.utils import json as kombu_json

from . import registry
from .dispatch import PendingCall, flush
from .tasks import MESSAGE_KEYS

if TYPE_CHECKING:
    from .models import DeadLetter

logger = logging.getLogger("deferred_signals")

#: Why a letter published again is not marked replayed.
LOST = "neither the broker nor the outbox took it (logged as LOST): still a dead letter"


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
    skipped with the reason, and the others are replayed. Publishing follows the commit
    path: what the broker does not confirm goes to the outbox. A letter is marked replayed
    only once the broker or the outbox has its call, and not when it failed again meanwhile.
    """
    from .models import DeadLetter, OutboxCall

    calls: list[PendingCall] = []
    replayed: list[DeadLetter] = []
    skipped: list[Skipped] = []
    for letter in letters:
        try:
            calls.append(_call_of(letter))
        except Unreplayable as error:
            skipped.append(_skip(letter, str(error)))
            continue
        replayed.append(letter)
    if dry_run or not calls:
        return replayed, skipped
    lost = {call.id for call in flush(calls, router.db_for_write(OutboxCall))}
    now = timezone.now()
    marked: list[DeadLetter] = []
    for letter in replayed:
        if letter.call_id in lost:
            skipped.append(_skip(letter, LOST))
            continue
        marked.append(letter)
        # A worker may have taken the message and recorded a new failure already: the row
        # then stays a dead letter not replayed (record() cleared replayed_at).
        rows = DeadLetter.objects.using(letter._state.db or router.db_for_write(DeadLetter))
        if rows.filter(pk=letter.pk, last_failed_at=letter.last_failed_at).update(replayed_at=now):
            letter.replayed_at = now
    return marked, skipped


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
    body.pop("dbf", None)  # a new database-outage window for the new delivery
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
