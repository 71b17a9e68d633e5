"""A stand-in for a CRM's HTTP API that is down more often than not."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import User

from .models import AuditLog


class CRMUnavailable(Exception):
    """The CRM did not answer; worth retrying later (see ``DEFERRED_SIGNALS`` in settings)."""


def push_contact(user: User) -> None:
    """Create ``user`` as a CRM contact; fails the first few times for every contact.

    A real client would POST to the CRM here. This one counts the failures already logged
    for the contact, which is enough to fail exactly ``CRM_FAILURES_BEFORE_SUCCESS`` times.
    """
    failures = AuditLog.objects.filter(
        username=user.username, event=AuditLog.Event.CRM_SYNC_FAILED
    ).count()
    if failures < settings.CRM_FAILURES_BEFORE_SUCCESS:
        raise CRMUnavailable("the CRM timed out")
