"""The sign-ups the demo performs, through the project's real entry points."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import transaction
from django.db.models.signals import pre_save
from django.test import Client, override_settings
from django.urls import reverse


@dataclass
class SignUp:
    """One sign-up, as seen from the process that made it (wall-clock times)."""

    username: str
    email: str
    how: str
    started: float
    finished: float
    response: str = ""  # the HTTP status, for a web sign-up
    committed: float | None = None  # None: the transaction rolled back

    @property
    def took_ms(self) -> float:
        return (self.finished - self.started) * 1000

    @property
    def outcome(self) -> str:
        fate = "rolled back" if self.committed is None else "committed"
        returned = f"{self.response}, " if self.response else ""
        return f"{returned}{fate}, in {self.took_ms:,.1f} ms"


@contextmanager
def observe_commits() -> Iterator[dict[str, float]]:
    """Note when each new user's transaction commits: ``{username: time.time()}``.

    Demo instrumentation, not part of the example. It hooks ``pre_save`` so that its
    ``on_commit`` callback is registered before deferred_signals' own (``post_save``), and
    Django runs them in that order: the time noted is the commit, before any publishing.
    """
    committed: dict[str, float] = {}

    def note_commit(sender: type[User], instance: User, **kwargs: Any) -> None:
        username = instance.username
        if instance.pk is None:
            transaction.on_commit(lambda: committed.setdefault(username, time.time()))

    pre_save.connect(note_commit, sender=User, weak=False, dispatch_uid="demo.observe_commits")
    try:
        yield committed
    finally:
        pre_save.disconnect(sender=User, dispatch_uid="demo.observe_commits")


def _csrf_token(client: Client) -> str:
    return client.cookies["csrftoken"].value


def sign_up_on_the_web(client: Client, username: str, email: str) -> SignUp:
    """GET the form, then POST it with its CSRF token, as a browser does."""
    url = reverse("accounts:register")
    page = client.get(url)
    if page.status_code != 200:
        raise RuntimeError(f"GET {url} answered {page.status_code}")
    data = {"username": username, "email": email, "csrfmiddlewaretoken": _csrf_token(client)}
    started = time.time()
    response = client.post(url, data)
    finished = time.time()
    if response.status_code != 302:
        raise RuntimeError(f"POST {url} for {username} answered {response.status_code}")
    status = f"{response.status_code} {response.reason_phrase}"
    return SignUp(username, email, f"POST {url}", started, finished, response=status)


def sign_up_with_the_command(username: str, email: str, *options: str) -> SignUp:
    """``manage.py register_user USERNAME EMAIL [OPTIONS]``, run in this process."""
    started = time.time()
    call_command("register_user", username, email, *options, stdout=io.StringIO())
    finished = time.time()
    how = " ".join(["manage.py register_user", username, email, *options])
    return SignUp(username, email, how, started, finished)


@contextmanager
def handlers_inline() -> Iterator[None]:
    """The synchronous variant, for comparison: every deferred handler runs in the request.

    ``EAGER`` runs them right after the commit, in this process, before the response goes
    out, as plain receivers calling the SMTP server and the CRM would. The CRM answers at
    once here (no failures): the best case for running them inline.
    """
    eager = {**settings.DEFERRED_SIGNALS, "EAGER": True}
    with override_settings(DEFERRED_SIGNALS=eager, CRM_FAILURES_BEFORE_SUCCESS=0):
        yield
