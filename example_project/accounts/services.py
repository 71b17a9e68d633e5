"""Registration, shared by the web view and the ``register_user`` command."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from .signals import user_registered


def register_user(username: str, email: str, *, source: str) -> User:
    """Create the user and announce it, in one transaction.

    Both ``post_save`` (from ``create_user``) and ``user_registered`` are sent inside the
    transaction; the deferred receivers' tasks are published only once it commits, so a
    worker can never look for a user that is not in the database yet.
    """
    with transaction.atomic():
        user = User.objects.create_user(username=username, email=email)
        user_registered.send(sender=User, user=user, source=source, registered_at=timezone.now())
    return user
