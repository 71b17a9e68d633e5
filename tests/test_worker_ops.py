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
    # Not "discards": the worker keeps such calls as dead letters (test_worker_faults), and the
    # usual cause in development is a worker started before the handler was written.
    assert f"  not imported by: {worker}: such a worker does not run this handler's calls" in text
    assert "it keeps them as dead letters" in text
    assert "Restart a worker started before the handler was added" in text
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


def test_list_does_not_name_a_worker_that_imported_a_handler_named_with_spaces(
    worker: Worker, settings: Any, tmp_path: Any
) -> None:
    """A handler's name is any str. ``inspect registered`` lists a task as "name [attr=...]"
    when it has a rate_limit: cut at the first space, the name was never found, and ``list``
    named every worker under 'not imported by', the one running the handler included."""
    from deferred_signals import registry
    from tests.conftest import current
    from tests.spaced_handlers import spaced, spaced_signal

    if worker.broker != "redis":
        pytest.skip("one broker is enough: the reply's format is the worker's, not the broker's")
    name = "tests spaced handler"
    if registry.get(name) is None:  # imported by an earlier run of this test, then removed
        from deferred_signals import connect

        connect(spaced_signal, spaced, defer=True, name=name, rate_limit="100/s")
    own = Worker(
        "redis",
        {alias: worker.env[f"DS_TEST_DB_{alias.upper()}"] for alias in ("default", "other")},
        tmp_path,
        pool="solo",
        env={"DS_TEST_WORKER_IMPORTS": "tests.spaced_handlers"},
    )
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "EAGER": False,
        "HANDLERS": {name: {"queue": own.queue}},
    }
    own.start()
    try:
        assert f"  . {name}\n" in own.log()  # the worker's banner: it has the task

        def entry() -> dict[str, Any] | None:
            data = StringIO()
            call_command("deferred_signals", "list", "--json", "--timeout", "2", stdout=data)
            found: dict[str, Any] = {e["name"]: e for e in json.loads(data.getvalue())}[name]
            # A loaded machine may miss one round of replies: ask again rather than time it.
            return found if isinstance(found["workers"], list) and found["workers"] else None

        with current(own.app):
            found = wait_for(entry, what="the worker's replies to active_queues and registered")
    finally:
        own.stop()
        own.delete_queue()
        spaced_signal.disconnect(spaced)
        registry.unregister(name)
    assert [one.split("@")[0] for one in found["workers"]] == [own.queue]
    assert found["unregistered_on"] == []
