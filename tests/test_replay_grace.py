"""A replay's outbox rows and the relay's OUTBOX_GRACE (review of c6115c5)."""

from __future__ import annotations

import collections
import threading
import time
import uuid

import pytest
from django.db import connections
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals.models import DeadLetter, OutboxCall
from deferred_signals.outbox import body_text
from deferred_signals.relay import Relay
from tests.conftest import Queue
from tests.test_operations import EVENT, body, command, published

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_replay_of_many_letters_is_not_relayed_behind_its_back(
    postgres_only: None, redis_queue: Queue, settings: SettingsWrapper
) -> None:
    """Each claim commits an outbox row the relay may take once OUTBOX_GRACE is over. The
    replay claimed every letter before publishing any: past OUTBOX_GRACE of claims (1 s
    here, ~500 letters; 30 s by default, ~13,000), a relay running meanwhile published the
    first rows while the replay was still claiming, and the replay published them again."""
    n = 1500
    DeadLetter.objects.bulk_create(
        DeadLetter(
            call_id=str(uuid.uuid4()), handler=EVENT, body=body_text(body(str(i))),
            exception="E", message="m", traceback="t", attempts=4,
        )
        for i in range(n)
    )  # fmt: skip
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "OUTBOX_GRACE": 1}
    done = threading.Event()

    def relaying() -> None:
        try:
            relay = Relay(databases=["default"])
            while not done.is_set():
                relay.run_once()
                time.sleep(0.05)
        finally:
            for c in connections.all():
                c.close()

    thread = threading.Thread(target=relaying)
    thread.start()
    started = time.monotonic()
    try:
        out, err = command("replay", "--all")
    finally:
        took = time.monotonic() - started
        done.set()
        thread.join()
    sent = collections.Counter(task_id for task_id, _ in published(redis_queue))
    twice = [k for k, v in sent.items() if v > 1]
    assert f"replayed {n} dead letter(s), skipped 0" in out, (out, err)
    assert len(sent) == n
    assert not twice, f"{len(twice)} of {n} calls published twice (replay took {took:.1f} s)"
    assert not OutboxCall.objects.exists()
