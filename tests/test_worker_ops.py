"""End to end, what operators rely on: a real worker, on Redis and on RabbitMQ.

``list`` sees the live worker consuming a handler's queue; a renamed handler still runs the
messages queued under its former name.
"""

from __future__ import annotations

import json
import uuid
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from deferred_signals.codec import Encoder
from deferred_signals.tasks import MESSAGE_VERSION
from tests.conftest import records, wait_for
from tests.workers import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def test_list_shows_the_live_worker_consuming_each_queue(deferred_to: Worker) -> None:
    def marker() -> dict[str, Any] | None:
        out = StringIO()
        call_command("deferred_signals", "list", "--json", "--timeout", "2", stdout=out)
        entries = {entry["name"]: entry for entry in json.loads(out.getvalue())}
        entry: dict[str, Any] = entries["tests.testapp.handlers.marker"]
        # A loaded machine may miss one round of replies: ask again rather than time it.
        return entry if isinstance(entry["workers"], list) and entry["workers"] else None

    entry = wait_for(marker, what="the worker's reply to active_queues")
    assert entry["queue"] == deferred_to.queue
    assert [worker.split("@")[0] for worker in entry["workers"]] == [deferred_to.queue]


def test_a_message_queued_under_a_former_name_runs_the_renamed_handler(
    deferred_to: Worker,
) -> None:
    label = uuid.uuid4().hex
    body = {
        "v": MESSAGE_VERSION,
        "signal": 0,
        "sender": None,
        "kwargs": {"label": Encoder(fresh=True, fields=False).encode(label)},
    }
    deferred_to.app.send_task(
        "tests.testapp.handlers.old_name", kwargs=body, queue=deferred_to.queue
    )
    (record,) = wait_for(
        lambda: [r for r in records("renamed") if label in str(r.call)], what="the renamed handler"
    )
    assert record.call["kwargs"]["label"]["repr"] == repr(label)
    assert record.call["signal"] == {"type": "Signal", "name": "renamed_signal"}
