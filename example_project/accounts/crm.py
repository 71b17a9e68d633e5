"""A stand-in for a CRM's HTTP API: slow, down more often than not, and strict about emails."""

from __future__ import annotations

import time

from django.conf import settings
from django.contrib.auth.models import User

from .models import AuditLog


class CRMUnavailable(Exception):
    """The CRM did not answer; worth retrying later (see ``DEFERRED_SIGNALS`` in settings)."""


class CRMRejected(Exception):
    """The CRM refused the contact (an HTTP 422): retrying the same data cannot help."""


def push_contact(user: User) -> None:
    """Create ``user`` as a CRM contact, after ``CRM_LATENCY`` seconds, as an HTTP call would.

    It times out the first ``CRM_FAILURES_BEFORE_SUCCESS`` times for every contact (it
    counts the failures already logged for the contact), then refuses an address on the
    reserved ``.invalid`` domain, as a CRM that validates emails does.
    """
    time.sleep(settings.CRM_LATENCY)
    failures = AuditLog.objects.filter(
        username=user.username, event=AuditLog.Event.CRM_SYNC_FAILED
    ).count()
    if failures < settings.CRM_FAILURES_BEFORE_SUCCESS:
        raise CRMUnavailable("the CRM timed out")
    if user.email.lower().endswith(".invalid"):
        raise CRMRejected(f"422 Unprocessable Entity: {user.email} is not a deliverable address")
