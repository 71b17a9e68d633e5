from __future__ import annotations

import os
from datetime import datetime
from typing import ClassVar

from django.db import models
from django.utils import timezone


class AuditLogManager(models.Manager["AuditLog"]):
    def record(
        self,
        event: str,
        username: str,
        handler: str,
        detail: str = "",
        signal_sent_at: datetime | None = None,
    ) -> AuditLog:
        """Write one entry, stamped with the time and the id of the process writing it."""
        return self.create(
            event=event,
            username=username,
            handler=handler,
            detail=detail,
            signal_sent_at=signal_sent_at,
            pid=os.getpid(),
        )


class AuditLog(models.Model):
    """What the receivers did, where (``pid``) and when (``created_at``)."""

    class Event(models.TextChoices):
        SIGNAL_RECEIVED = "signal_received", "user_registered received inline"
        WELCOME_EMAIL = "welcome_email", "welcome email sent"
        REGISTERED = "registered", "registration audited"
        CRM_SYNC_FAILED = "crm_sync_failed", "CRM sync failed"
        CRM_SYNC_REJECTED = "crm_sync_rejected", "CRM refused the contact"
        CRM_SYNCED = "crm_synced", "CRM sync succeeded"

    event = models.CharField(max_length=32, choices=Event.choices)
    username = models.CharField(max_length=150, db_index=True)
    handler = models.CharField(max_length=200, help_text="The receiver that wrote the entry.")
    detail = models.CharField(max_length=255, blank=True)
    signal_sent_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    pid = models.PositiveIntegerField(help_text="Process that wrote the entry.")

    objects: ClassVar[AuditLogManager] = AuditLogManager()

    class Meta:
        ordering = ("created_at", "id")

    def __str__(self) -> str:
        return f"{self.created_at:%H:%M:%S.%f} {self.username}: {self.get_event_display()}"
