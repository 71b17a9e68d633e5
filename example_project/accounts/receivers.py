"""The receivers of the accounts app: three run on a Celery worker, one inline.

The deferred ones (``defer=True``) run on a worker after the registration's transaction
commits, so a slow SMTP server or a flaky CRM never slows down or breaks a sign-up. Their
retries and other task options live in ``settings.DEFERRED_SIGNALS``, under their names
(``accounts.receivers.<function>``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from deferred_signals import current_call, receiver
from django.contrib.auth.models import User
from django.core.mail import send_mail
from django.db.models.signals import post_save

from . import crm
from .models import AuditLog
from .signals import user_registered

logger = logging.getLogger(__name__)
Event = AuditLog.Event


@receiver(post_save, sender=User, defer=True)
def send_welcome_email(sender: type[User], instance: User, created: bool, **kwargs: Any) -> None:
    """Welcome a new user. ``instance`` is the committed row, fetched fresh by the worker."""
    if not created:
        return
    send_mail(
        subject="Welcome aboard",
        message=f"Hello {instance.username}, thanks for signing up!",
        from_email=None,
        recipient_list=[instance.email],
    )
    AuditLog.objects.record(
        Event.WELCOME_EMAIL, instance.username, "send_welcome_email", f"to {instance.email}"
    )


@receiver(user_registered, sender=User, defer=True)
def record_registration(
    sender: type[User], user: User, source: str, registered_at: datetime, **kwargs: Any
) -> None:
    """Audit the sign-up. ``registered_at`` arrives as the aware datetime that was sent."""
    AuditLog.objects.record(
        Event.REGISTERED,
        user.username,
        "record_registration",
        f"via {source}",
        signal_sent_at=registered_at,
    )


@receiver(user_registered, sender=User, defer=True)
def sync_to_crm(sender: type[User], user: User, **kwargs: Any) -> None:
    """Push the new user to the CRM, which often fails: the worker retries it, per settings.

    A refusal (``CRMRejected``) is not retried: the call becomes a dead letter, to replay
    once the data is fixed. The call id, the same on every retry and replay, is a natural
    idempotency key for a real CRM; here it goes into the audit log.
    """
    call = current_call()
    call_id = f"call {call.id[:8]}" if call is not None else ""
    try:
        crm.push_contact(user)
    except crm.CRMUnavailable as exc:
        AuditLog.objects.record(Event.CRM_SYNC_FAILED, user.username, "sync_to_crm", str(exc))
        raise  # autoretry_for in settings.DEFERRED_SIGNALS turns this into a retry
    except crm.CRMRejected as exc:
        detail = f"{call_id}: {exc}"
        AuditLog.objects.record(Event.CRM_SYNC_REJECTED, user.username, "sync_to_crm", detail)
        raise  # not retried: a dead letter
    AuditLog.objects.record(Event.CRM_SYNCED, user.username, "sync_to_crm", call_id)


@receiver(user_registered, sender=User)
def log_registration(sender: type[User], user: User, source: str, **kwargs: Any) -> None:
    """A plain receiver (no ``defer``): exactly Django's, it runs inline, in the transaction.

    Its audit entry commits or rolls back with the registration itself.
    """
    logger.info("user_registered: %s signed up via %s", user.username, source)
    AuditLog.objects.record(Event.SIGNAL_RECEIVED, user.username, "log_registration", source)
