"""End to end: a real ``celery worker`` process, on Redis and on RabbitMQ, with PostgreSQL.

Every test runs once per broker. Handlers write ``Record`` rows from the worker process;
the test reads them back from the same PostgreSQL test database.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from django.db import transaction

from tests.conftest import records, sync_calls, wait_for
from tests.testapp.handlers import Money, Plain
from tests.testapp.models import Article, Attempt, Author, Record
from tests.testapp.signals import flaky_signal, slow_signal, user_registered
from tests.workers import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]


def unique() -> str:
    return uuid.uuid4().hex[:12]


def article_records(handler: str, title: str) -> list[Record]:
    return [
        r
        for r in records(handler)
        if r.call["kwargs"]["instance"]["fields"]["title"]["repr"] == repr(title)
    ]


def send_marker(label: str) -> None:
    """A call published at once (autocommit): proof the worker is consuming right now."""
    slow_signal.send(sender=None, label=label)


def marker_seen(label: str) -> list[Record]:
    return [r for r in records("marker") if r.call["kwargs"]["label"]["repr"] == repr(label)]


def test_post_save_runs_in_the_worker_after_commit(deferred_to: Worker) -> None:
    title = unique()
    with transaction.atomic():
        Article.objects.create(title=title, price=Decimal("3.50"))
        committing_at = time.time()
    (saved,) = wait_for(lambda: article_records("article_saved", title), what="article_saved")
    (snapshot,) = wait_for(lambda: article_records("article_snapshot", title), what="snapshot")
    for record in (saved, snapshot):
        assert record.pid != os.getpid()  # ran in the worker, not here
        assert record.ran_at >= committing_at
    # The fresh fetch found the committed row: the handler saw what a sync handler saw.
    assert saved.call == next(c for c in sync_calls("article_saved") if title in str(c))


def test_custom_signal_arguments_survive_the_broker(deferred_to: Worker) -> None:
    label = unique()
    author = Author.objects.create(name=label)
    kwargs = {
        "instance": author,
        "label": label,
        "when": datetime.datetime(2026, 11, 24, 9, 30, tzinfo=datetime.timezone.utc),
        "money": Money(Decimal("19.99"), "EUR"),
        "tags": frozenset({"a", "b"}),
        "nested": {1: (Decimal("1.5"), datetime.timedelta(seconds=3)), "ids": {uuid.UUID(int=7)}},
    }
    with transaction.atomic():
        user_registered.send(sender=Plain, **kwargs)
    (record,) = wait_for(
        lambda: [r for r in records("user_event") if label in str(r.call)], what="user_event"
    )
    assert record.call == sync_calls("user_event")[0]


def test_a_slow_transaction_is_not_seen_early(deferred_to: Worker) -> None:
    title, label = unique(), unique()
    with transaction.atomic():
        Article.objects.create(title=title)
        # Another thread (its own connection, in autocommit) publishes at once: the worker
        # is demonstrably consuming while this transaction stays open...
        sender = threading.Thread(target=send_marker, args=(label,))
        sender.start()
        sender.join()
        wait_for(lambda: marker_seen(label), what="the marker, during the transaction")
        # ...and still never sees this transaction's call.
        deadline = time.time() + 1.5
        while time.time() < deadline:
            assert article_records("article_saved", title) == []
            time.sleep(0.1)
        committing_at = time.time()
    (record,) = wait_for(lambda: article_records("article_saved", title), what="article_saved")
    assert record.ran_at >= committing_at


def test_rollback_sends_nothing(deferred_to: Worker) -> None:
    title, label = unique(), unique()
    with pytest.raises(RuntimeError), transaction.atomic():
        Article.objects.create(title=title)
        raise RuntimeError("rolled back")
    send_marker(label)
    wait_for(lambda: marker_seen(label), what="the marker")
    time.sleep(0.5)  # the worker has two processes: give a stray message time to land
    assert article_records("article_saved", title) == []
    assert article_records("article_snapshot", title) == []


def test_failing_handler_is_retried_per_settings(deferred_to: Worker) -> None:
    key = unique()
    with transaction.atomic():
        flaky_signal.send(sender=None, key=key, fail_times=2)
    (record,) = wait_for(
        lambda: [r for r in records("flaky") if key in str(r.call)], what="the third attempt"
    )
    assert record.call["kwargs"]["attempts"]["repr"] == "3"
    assert Attempt.objects.get(key=key).count == 3


def test_retries_stop_at_max_retries(deferred_to: Worker) -> None:
    key = unique()
    flaky_signal.send(sender=None, key=key, fail_times=100)  # max_retries=3 in settings
    wait_for(lambda: Attempt.objects.filter(key=key, count=4).exists(), what="4 attempts")
    label = unique()
    send_marker(label)
    wait_for(lambda: marker_seen(label), what="the marker")
    time.sleep(0.5)
    assert Attempt.objects.get(key=key).count == 4  # 1 run + 3 retries, then no more
    wait_for(lambda: f"FlakyError: attempt 4 of {key}" in deferred_to.log(), what="the failure log")


def test_forged_messages_are_rejected_and_the_worker_carries_on(
    deferred_to: Worker, tmp_path: Path
) -> None:
    task = "tests.testapp.handlers.article_saved"
    proof = tmp_path / "pwned"
    forged = {
        "missing fields": {"v": 1, "signal": 0},
        "extra fields": {"v": 1, "signal": 0, "sender": None, "kwargs": {}, "code": "x"},
        "bad version": {"v": 99, "signal": 0, "sender": None, "kwargs": {}},
        "bad signal index": {"v": 1, "signal": 5, "sender": None, "kwargs": {}},
        "bad kwarg name": {"v": 1, "signal": 0, "sender": None, "kwargs": {"signal": 1}},
        "unloaded module": {
            "v": 1,
            "signal": 0,
            "sender": {"$t": "class", "v": "antigravity:Fly"},
            "kwargs": {},
        },
        "unknown model": {
            "v": 1,
            "signal": 0,
            "sender": None,
            "kwargs": {"instance": {"$t": "model", "m": "evil.model", "pk": 1, "db": "default"}},
        },
        "unknown tag": {"v": 1, "signal": 0, "sender": None, "kwargs": {"x": {"$t": "pickle"}}},
    }
    ids = {}
    for what, body in forged.items():
        ids[what] = deferred_to.app.send_task(task, kwargs=body, queue=deferred_to.queue).id
    positional = deferred_to.app.send_task(task, args=[1], queue=deferred_to.queue).id
    # A task name that no handler registered: Celery itself refuses it, nothing is imported.
    deferred_to.app.send_task("os.system", args=[f"touch {proof}"], queue=deferred_to.queue)

    title = unique()
    Article.objects.create(title=title)
    wait_for(lambda: article_records("article_saved", title), what="a legitimate call afterwards")
    for message_id in [*ids.values(), positional]:
        wait_for(
            lambda message_id=message_id: (
                f"Rejected message {message_id} for deferred handler task {task}"
                in deferred_to.log()
            ),
            what=f"the rejection of {message_id}",
        )
    wait_for(lambda: "Received unregistered task of type 'os.system'" in deferred_to.log())
    assert not proof.exists()
    assert deferred_to.process is not None and deferred_to.process.poll() is None


def test_a_thousand_signals_in_one_transaction_each_run_once(deferred_to: Worker) -> None:
    label = unique()
    with transaction.atomic():
        for i in range(1000):
            user_registered.send(sender=None, label=label, i=i)
    done = wait_for(
        lambda: (
            (found := [r for r in records("user_event") if label in str(r.call)])
            and len(found) >= 1000
            and found
        ),
        timeout=60,
        what="1000 calls",
    )
    time.sleep(0.5)
    done = [r for r in records("user_event") if label in str(r.call)]
    numbers = sorted(int(r.call["kwargs"]["i"]["repr"]) for r in done)
    assert numbers == list(range(1000))  # every call exactly once


def test_row_deleted_before_the_worker_runs_is_skipped(deferred_to: Worker) -> None:
    title = unique()
    with transaction.atomic():
        Article.objects.create(title=title).delete()
    wait_for(lambda: article_records("article_snapshot", title), what="the snapshot handler")
    wait_for(
        lambda: (
            "Skipped deferred handler tests.testapp.handlers.article_saved" in deferred_to.log()
        ),
        what="the skip warning",
    )
    assert article_records("article_saved", title) == []
