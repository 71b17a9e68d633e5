"""A stand-in for an SMTP server: writes each email to a file, as slowly as a server answers."""

from __future__ import annotations

import time
from collections.abc import Sequence

from django.conf import settings
from django.core.mail import EmailMessage
from django.core.mail.backends.filebased import EmailBackend as FileBackend


class EmailBackend(FileBackend):
    """Django's file backend, after ``SMTP_LATENCY`` seconds per batch of messages.

    Connecting, greeting, authenticating and handing a message over to a real SMTP server
    takes a few hundred milliseconds: the time a sign-up would wait if it sent the email.
    """

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        if email_messages:
            time.sleep(settings.SMTP_LATENCY)
        return super().send_messages(email_messages)
