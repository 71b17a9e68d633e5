"""The tables of durable delivery: the outbox, dead letters and processed call ids.

Call ids are Celery task ids (UUID strings) kept as text, so every backend compares them
alike and raw SQL on the request path needs no conversion.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from .registry import NAME_LENGTH as NAME_LENGTH  # re-exported: deadletters.py reads it here

CALL_ID_LENGTH = 64


class OutboxCall(models.Model):
    """A committed call not yet confirmed by the broker; the relay publishes it.

    The row lives on the database alias whose transaction made the call: written inside that
    transaction (``DELIVERY="outbox"``) or right after its commit when publishing failed
    (spill). It is deleted once the broker has confirmed the message.
    """

    id = models.CharField("call id", max_length=CALL_ID_LENGTH, primary_key=True)
    handler = models.CharField(max_length=NAME_LENGTH, db_index=True)
    #: The message body as published (JSON text), so a relay republishes it unchanged.
    body = models.TextField()
    created = models.DateTimeField(default=timezone.now)
    attempts = models.PositiveIntegerField(default=0)
    #: The relay leaves the row alone until then (a grace period for the fast path, backoff).
    next_attempt_at = models.DateTimeField(db_index=True)
    last_error = models.TextField(blank=True, default="")
    #: The trace the call was made in (Sentry's and OpenTelemetry's propagation headers, as
    #: JSON), for the relay to continue; "" when nothing traced the request. The database's
    #: own default too: a process still running the version before it inserts rows without
    #: the column while a deploy rolls out.
    trace = models.TextField(blank=True, default="", db_default="")

    class Meta:
        verbose_name = "pending outbox call"
        ordering = ("next_attempt_at",)

    def __str__(self) -> str:
        return f"{self.handler} [{self.id}]"


class DeadLetter(models.Model):
    """A call that failed for good: its handler raised for the last time, the pool stopped it
    (a hard time limit, a lost child whose message is not redelivered), or the message was
    refused. Replaying it publishes the same body again, with the same call id."""

    id = models.BigAutoField(primary_key=True)
    call_id = models.CharField(max_length=CALL_ID_LENGTH, unique=True)
    handler = models.CharField(max_length=NAME_LENGTH, db_index=True)
    body = models.TextField()
    exception = models.CharField(max_length=NAME_LENGTH, db_index=True)
    message = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=1)
    first_failed_at = models.DateTimeField(default=timezone.now)
    last_failed_at = models.DateTimeField(default=timezone.now, db_index=True)
    replayed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-last_failed_at",)

    def __str__(self) -> str:
        return f"{self.handler} [{self.call_id}]: {self.exception}"


class ProcessedCall(models.Model):
    """The call ids an ``idempotent=True`` handler has completed, written in its transaction."""

    call_id = models.CharField(max_length=CALL_ID_LENGTH, primary_key=True)
    handler = models.CharField(max_length=NAME_LENGTH)
    processed_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return f"{self.handler} [{self.call_id}]"


class RelayHeartbeat(models.Model):
    """When each relay (``host:pid``) last completed a loop: ``deferred_signals status``."""

    name = models.CharField(max_length=NAME_LENGTH, primary_key=True)
    last_loop_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.name
