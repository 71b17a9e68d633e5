"""Replaying dead letters: the same message, the same call id, through the normal publish path."""

from __future__ import annotations

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


@dataclass(frozen=True)
class Skipped:
    letter: DeadLetter
    reason: str


def replay(
    letters: Iterable[DeadLetter], dry_run: bool = False
) -> tuple[list[DeadLetter], list[Skipped]]:
    """Publish each dead letter's message again with its call id; mark it replayed.

    A letter whose handler is not registered in this process, or whose message is not one
    this package could have sent (a refused, forged message), is skipped with the reason.
    Publishing follows the commit path: what the broker does not confirm goes to the outbox.
    """
    from .models import OutboxCall

    calls: list[PendingCall] = []
    replayed: list[DeadLetter] = []
    skipped: list[Skipped] = []
    for letter in letters:
        handler = registry.get(letter.handler)
        if handler is None:
            reason = f"no deferred handler is registered as {letter.handler!r}"
            skipped.append(Skipped(letter, reason))
            continue
        try:
            body = kombu_json.loads(letter.body)
        except ValueError:
            body = None
        if type(body) is not dict or not body.keys() >= MESSAGE_KEYS:
            skipped.append(Skipped(letter, "its message is not one this package sends"))
            continue
        body.pop("dbf", None)  # a new database-outage window for the new delivery
        calls.append(PendingCall(handler, letter.call_id, body))
        replayed.append(letter)
    if dry_run or not calls:
        return replayed, skipped
    flush(calls, router.db_for_write(OutboxCall))
    now = timezone.now()
    for letter in replayed:
        letter.replayed_at = now
        letter.save(update_fields=["replayed_at"])
    return replayed, skipped
