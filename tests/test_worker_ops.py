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


def only_in_this_process(**kwargs: Any) -> None:
    """A handler the worker never imports (registered by the test that needs it)."""


def test_list_names_a_consuming_worker_that_has_not_imported_the_handler(
    deferred_to: Worker,
) -> None:
    """The worker would discard the handler's calls as unregistered tasks: list says so,
    instead of showing it as consuming them."""
    from django.dispatch import Signal

    from deferred_signals import connect, registry

    name = "tests.test_worker_ops.only_in_this_process"
    signal = Signal()
    connect(signal, only_in_this_process, defer=True)
    try:

        def entries() -> dict[str, dict[str, Any]] | None:
            text, data = StringIO(), StringIO()
            call_command("deferred_signals", "list", "--timeout", "2", stdout=text)
            call_command("deferred_signals", "list", "--json", "--timeout", "2", stdout=data)
            found = {entry["name"]: entry for entry in json.loads(data.getvalue())}
            found["text"] = {"out": text.getvalue()}
            workers = found[name]["workers"]
            # A loaded machine may miss one round of replies: ask again rather than time it.
            return found if isinstance(workers, list) and workers else None

        found = wait_for(entries, what="the worker's replies to active_queues and registered")
    finally:
        signal.disconnect(only_in_this_process)
        registry.unregister(name)
    (worker,) = found[name]["workers"]
    assert found[name]["unregistered_on"] == [worker]
    assert found["tests.testapp.handlers.marker"]["unregistered_on"] == []
    text = found["text"]["out"]
    assert f"{name}\n" in text
    assert f"  not imported by: {worker}: such a worker discards this handler's calls" in text
    assert text.count("not imported by") == 1


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
