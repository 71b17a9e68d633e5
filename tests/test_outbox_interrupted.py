"""Waiting outbox rows whose INSERT is interrupted by something other than a database error.

A worker's timeout (``SystemExit``), ``KeyboardInterrupt`` or ``MemoryError`` during the
INSERT at commit: ``atomic()`` only rolls back after a ``DatabaseError``, and for anything
else goes straight to ``set_autocommit(True)``, which COMMITs on SQLite and MySQL. These run
on both databases of the suite (SQLite in the fast pass, PostgreSQL in the other).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import outbox_buffer
from deferred_signals.models import OutboxCall
from tests.testapp.models import Author
from tests.testapp.signals import user_registered

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def outbox_delivery(settings: SettingsWrapper) -> None:
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "EAGER": False,
        "DELIVERY": "outbox",
    }


def interrupt_inserts(monkeypatch: pytest.MonkeyPatch) -> None:
    def insert(connection: Any, rows: Any) -> None:
        raise SystemExit("the worker's time is up")

    monkeypatch.setattr(outbox_buffer, "insert", insert)


def test_an_interrupted_write_at_commit_commits_nothing(
    outbox_delivery: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit), transaction.atomic():
        Author.objects.create(name="business row")
        user_registered.send(sender=None, i=0)  # the first row: written at once
        interrupt_inserts(monkeypatch)
        user_registered.send(sender=None, i=1)  # these wait for the commit
        user_registered.send(sender=None, i=2)
    monkeypatch.undo()
    assert not Author.objects.filter(name="business row").exists()
    assert not OutboxCall.objects.exists()


def test_an_interrupted_write_before_a_statement_dooms_the_transaction(
    outbox_delivery: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with transaction.atomic():
        Author.objects.create(name="business row")
        user_registered.send(sender=None, i=0)
        interrupt_inserts(monkeypatch)
        user_registered.send(sender=None, i=1)
        with pytest.raises(SystemExit):
            Author.objects.count()  # the waiting row goes first, and is interrupted
        assert transaction.get_connection().needs_rollback
        monkeypatch.undo()
    assert not Author.objects.filter(name="business row").exists()
    assert not OutboxCall.objects.exists()
