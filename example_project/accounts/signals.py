"""The accounts app's own signals."""

from __future__ import annotations

from django.dispatch import Signal

#: Sent once a new user is saved, inside the registration's transaction, with
#: ``sender=User`` and the keyword arguments ``user`` (the new ``User``), ``source``
#: (``"web"`` or ``"cli"``) and ``registered_at`` (an aware ``datetime``).
user_registered = Signal()
