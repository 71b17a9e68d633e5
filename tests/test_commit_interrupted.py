"""A ``BaseException`` out of one of the package's commit hooks, and the commit's other hooks.

Django runs a commit's ``on_commit`` callbacks from a list of its own: when one raises a
``BaseException`` (``KeyboardInterrupt``, ``SystemExit``, gevent's ``Timeout``, which even a
robust callback lets through), the callbacks after it never run. Calls of the same commit in
other batches (another savepoint context, a coalesced call, calls that waited for a second
database) would never be published nor spilled: lost. Real transactions, a real Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery.signals import before_task_publish
from django.db import transaction

from deferred_signals.models import OutboxCall
from tests.conftest import Interrupted, Queue
from tests.testapp.models import Author
from tests.testapp.signals import row_touched, user_registered

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


@pytest.fixture
def interrupt_first_publish() -> Iterator[None]:
    """The commit's first message raises ``Interrupted`` in a ``before_task_publish``
    receiver (as a signal handler would, mid-publish); later ones go through."""
    fired: list[int] = []

    def receiver(**kwargs: Any) -> None:
        if not fired:
            fired.append(1)
            raise Interrupted

    before_task_publish.connect(receiver, weak=False)
    yield
    before_task_publish.disconnect(receiver)


def outbox_ids(using: str = "default") -> set[str]:
    return set(OutboxCall.objects.using(using).values_list("id", flat=True))


def test_an_interruption_spills_the_other_batches_of_its_commit(
    redis_queue: Queue, call_ids: list[str], interrupt_first_publish: None
) -> None:
    """Three batches (the outer block, a savepoint, the outer block again) and a coalesced
    call: the first batch's publish is interrupted. Every committed call ends in the broker
    or the outbox; none of a rolled-back savepoint does."""
    with pytest.raises(Interrupted), transaction.atomic():
        author = Author.objects.create(name="interrupted")
        user_registered.send(sender=None, i=0)
        user_registered.send(sender=None, i=1)
        with transaction.atomic():
            user_registered.send(sender=None, i=2)
        rolled_back = len(call_ids)
        try:
            with transaction.atomic():
                user_registered.send(sender=None, i=99)
                raise ValueError("rolled back")
        except ValueError:
            pass
        user_registered.send(sender=None, i=3)
        row_touched.send(
            sender=Author, instance=author, label="a", created=True, update_fields=None
        )
    assert Author.objects.filter(name="interrupted").exists(), "committed"
    committed = set(call_ids) - {call_ids[rolled_back]}
    assert len(committed) == 5
    in_broker = {message["headers"]["id"] for message in redis_queue.messages()}
    lost = committed - in_broker - outbox_ids()
    assert not lost, f"{len(lost)} committed call(s) neither published nor spilled"
    assert call_ids[rolled_back] not in in_broker | outbox_ids(), "rolled back: never sent"
    assert outbox_ids() == committed, "nothing was published after the interruption"


def test_an_interruption_spills_the_calls_waiting_for_its_commit_on_another_database(
    redis_queue: Queue, call_ids: list[str], interrupt_first_publish: None
) -> None:
    """A call on ``default`` made while ``other`` has a transaction open, for an instance
    written there, waits for ``other``'s commit: that commit's first batch is interrupted."""
    with pytest.raises(Interrupted), transaction.atomic(using="other"):
        author = Author.objects.using("other").create(name="elsewhere")
        user_registered.send(sender=None, i=0, using="other")
        with transaction.atomic():
            # No ``using``, an instance of ``other``: default's commit hands it to other's.
            user_registered.send(sender=None, i=1, instance=author)
    committed = set(call_ids)
    assert len(committed) == 2
    in_broker = {message["headers"]["id"] for message in redis_queue.messages()}
    stored = outbox_ids() | outbox_ids("other")
    lost = committed - in_broker - stored
    assert not lost, f"{len(lost)} committed call(s) neither published nor spilled"
