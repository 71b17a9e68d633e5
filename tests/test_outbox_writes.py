"""``delivery="outbox"``: a transaction's calls written in few INSERTs, and never otherwise.

Real PostgreSQL transactions and savepoints, a real Redis queue nobody consumes. The rows
after a transaction's first wait on the connection and reach the table before the
connection's next statement or its commit: each test checks that a row commits if and only
if the transaction that sent its call commits, and that no statement sees the table
without the rows written before it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import OutboxWriteError
from deferred_signals.models import OutboxCall
from tests.conftest import Queue
from tests.testapp.models import Author
from tests.testapp.signals import user_registered
from tests.workers import ROOT

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("postgres_only"),
]
TABLE = OutboxCall._meta.db_table
HANDLER = "tests.user_event"


@pytest.fixture
def outbox_queue(redis_queue: Queue, settings: SettingsWrapper) -> Queue:
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "DELIVERY": "outbox"}
    return redis_queue


def send(i: int, using: str | None = None, **extra: Any) -> None:
    if using is not None:
        extra["using"] = using
    user_registered.send(sender=None, i=i, **extra)


def labels(using: str = "default") -> list[int]:
    """The calls in the outbox table (read inside a transaction, a statement like any other)."""
    return sorted(json.loads(body)["kwargs"]["i"] for body in _bodies(using))


def _bodies(using: str) -> list[str]:
    return list(OutboxCall.objects.using(using).values_list("body", flat=True))


def published(queue: Queue) -> list[int]:
    """The calls in the queue, in publish order."""
    return [json.loads(base64.b64decode(m["body"]))[1]["kwargs"]["i"] for m in queue.messages()]


def outbox_inserts(captured: CaptureQueriesContext) -> list[int]:
    """Rows per INSERT into the outbox, in statement order."""
    return [
        query["sql"].count(f"'{HANDLER}'")
        for query in captured.captured_queries
        if query["sql"].startswith(f'INSERT INTO "{TABLE}"')
    ]


def test_consecutive_calls_are_written_with_one_insert(outbox_queue: Queue) -> None:
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        for i in range(100):
            send(i)
    # The first at once (a missing table fails at the send), the other 99 before COMMIT.
    assert outbox_inserts(captured) == [1, 99]
    assert published(outbox_queue) == list(range(100))
    assert not OutboxCall.objects.exists()  # deleted once published


def test_a_big_transaction_writes_a_hundred_rows_per_insert(outbox_queue: Queue) -> None:
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        for i in range(250):
            send(i)
    assert outbox_inserts(captured) == [1, 100, 100, 49]
    assert sorted(published(outbox_queue)) == list(range(250))


def test_a_statement_between_calls_writes_the_waiting_rows_first(outbox_queue: Queue) -> None:
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        send(0)
        send(1)
        send(2)
        Author.objects.create(name="between")
        send(3)
        inside = labels()  # the SELECT sees every call made before it
    statements = [query["sql"].split(" (")[0] for query in captured.captured_queries]
    assert statements[:5] == [
        "BEGIN",  # Django logs transaction control too
        f'INSERT INTO "{TABLE}"',  # 0, at once
        f'INSERT INTO "{TABLE}"',  # 1 and 2, before the author
        'INSERT INTO "testapp_author"',
        f'INSERT INTO "{TABLE}"',  # 3, before the SELECT
    ]
    assert outbox_inserts(captured) == [1, 2, 1]
    assert inside == [0, 1, 2, 3]
    assert published(outbox_queue) == [0, 1, 2, 3]


def test_a_rolled_back_savepoint_drops_only_the_calls_made_inside_it(outbox_queue: Queue) -> None:
    with transaction.atomic():
        send(0)
        send(1)  # waiting when the savepoint starts: written before it
        with pytest.raises(RuntimeError), transaction.atomic():
            send(2)
            send(3)
            assert labels() == [0, 1, 2, 3]
            send(4)  # waiting when the savepoint rolls back
            raise RuntimeError
        send(5)
        with transaction.atomic():  # released: its calls stay
            send(6)
        send(7)
        inside = labels()
    assert inside == [0, 1, 5, 6, 7]
    assert published(outbox_queue) == [0, 1, 5, 6, 7]
    assert not OutboxCall.objects.exists()


def test_nested_blocks_without_a_savepoint_share_the_transactions_fate(
    outbox_queue: Queue,
) -> None:
    with transaction.atomic():
        send(0)
        with transaction.atomic(savepoint=False):
            send(1)
            send(2)
        send(3)
    assert published(outbox_queue) == [0, 1, 2, 3]
    # An exception caught around a block without a savepoint dooms the whole transaction.
    with transaction.atomic():
        Author.objects.create(name="doomed")
        send(10)
        send(11)
        with pytest.raises(RuntimeError), transaction.atomic(savepoint=False):
            send(12)
            raise RuntimeError
    assert not Author.objects.filter(name="doomed").exists()
    assert published(outbox_queue) == [0, 1, 2, 3]
    assert not OutboxCall.objects.exists()


def test_a_rollback_drops_every_call_and_nothing_reaches_the_next_transaction(
    outbox_queue: Queue,
) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        for i in range(5):
            send(i)
        raise RuntimeError
    Author.objects.create(name="autocommit, next statement on the connection")
    with transaction.atomic():
        Author.objects.create(name="next transaction")
        send(5)
        send(6)
        inside = labels()
    assert inside == [5, 6]
    assert published(outbox_queue) == [5, 6]
    assert not OutboxCall.objects.exists()


def test_a_connection_closed_in_the_transaction_writes_nothing_later(outbox_queue: Queue) -> None:
    with transaction.atomic():
        send(0)
        send(1)
        send(2)
        connection.close()
    Author.objects.create(name="on a new connection")
    assert not OutboxCall.objects.exists()
    assert len(outbox_queue) == 0


@pytest.fixture
def failing_outbox() -> Iterator[None]:
    """A trigger refuses outbox rows whose body holds "refused" (a constraint the
    database enforces at INSERT time, as a full disk or a dropped table would)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION ds_refuse() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'outbox row refused'; END $$ LANGUAGE plpgsql"
        )
        cursor.execute(
            f'CREATE TRIGGER ds_refuse BEFORE INSERT ON "{TABLE}" FOR EACH ROW '
            "WHEN (NEW.body LIKE '%refused%') EXECUTE FUNCTION ds_refuse()"
        )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP TRIGGER ds_refuse ON "{TABLE}"')
            cursor.execute("DROP FUNCTION ds_refuse()")


FIX = f"(?s)Deferred handler '{HANDLER}'.*their 2 calls.*database 'default'.*" + (
    r"Has `manage.py migrate deferred_signals --database=default` run\?"
)


def test_a_write_failing_at_commit_rolls_the_business_data_back_and_raises(
    outbox_queue: Queue, failing_outbox: None
) -> None:
    with pytest.raises(OutboxWriteError, match=FIX) as raised, transaction.atomic():
        Author.objects.create(name="business row")
        send(0)
        send(1)
        send(2, note="refused")
    assert "outbox row refused" in str(raised.value)
    assert not Author.objects.filter(name="business row").exists()
    assert not OutboxCall.objects.exists() and len(outbox_queue) == 0
    # The connection is usable, and the next transaction commits normally.
    with transaction.atomic():
        send(3)
        send(4)
    assert published(outbox_queue) == [3, 4]


def test_a_write_failing_before_a_statement_dooms_the_transaction(
    outbox_queue: Queue, failing_outbox: None
) -> None:
    with transaction.atomic():
        Author.objects.create(name="business row")
        send(0)
        send(1)
        send(2, note="refused")
        with pytest.raises(OutboxWriteError, match=FIX):
            Author.objects.count()  # the waiting rows go first, and fail
        # Caught, but the transaction cannot go on: Django marked it for rollback.
    assert not Author.objects.filter(name="business row").exists()
    assert not OutboxCall.objects.exists() and len(outbox_queue) == 0


def test_a_transaction_marked_for_rollback_fails_as_django_says(outbox_queue: Queue) -> None:
    from django.db.transaction import TransactionManagementError

    with transaction.atomic():
        send(0)
        send(1)
        transaction.set_rollback(True)
        with pytest.raises(TransactionManagementError) as raised:
            Author.objects.count()
        assert not isinstance(raised.value, OutboxWriteError)
    assert not OutboxCall.objects.exists() and len(outbox_queue) == 0


def test_capture_on_commit_callbacks_publishes_and_deletes_the_waiting_rows(
    outbox_queue: Queue, django_capture_on_commit_callbacks: Any
) -> None:
    with transaction.atomic():
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            send(0)
            send(1)
            send(2)
        assert len(callbacks) == 3
        assert published(outbox_queue) == [0, 1, 2]
        assert labels() == []  # written before the DELETE of the published rows
        transaction.set_rollback(True)
    assert not OutboxCall.objects.exists()


def test_two_databases_in_one_request_keep_their_own_rows(outbox_queue: Queue) -> None:
    with (
        CaptureQueriesContext(connections["other"]) as on_other,
        transaction.atomic(),
        transaction.atomic(using="other"),
    ):
        for i in range(3):
            send(i)
            send(10 + i, using="other")
        assert labels("default") == [0, 1, 2]
        assert outbox_inserts(on_other) == [1]  # a statement on default leaves other's waiting
        assert labels("other") == [10, 11, 12]
    assert sorted(published(outbox_queue)) == [0, 1, 2, 10, 11, 12]
    # One commits while the other rolls back: each keeps to its own transaction.
    with transaction.atomic(using="other"):
        send(20, using="other")
        send(21, using="other")
        with pytest.raises(RuntimeError), transaction.atomic():
            send(30)
            send(31)
            raise RuntimeError
    assert sorted(published(outbox_queue)) == [0, 1, 2, 10, 11, 12, 20, 21]
    assert not OutboxCall.objects.exists() and not OutboxCall.objects.using("other").exists()


CHILD = """
import os, signal, sys
import django
import tests.celery_app
django.setup()
from django.conf import settings
from django.db import transaction
settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "DELIVERY": "outbox", "EAGER": False}
from deferred_signals import publisher
def die(calls, deadline=None):  # after COMMIT, before the publish: the process is killed
    os.kill(os.getpid(), signal.SIGKILL)
publisher.publish = die
from tests.testapp.models import Author
from tests.testapp.signals import user_registered
with transaction.atomic():
    Author.objects.create(name=sys.argv[1])
    for i in range(250):
        user_registered.send(sender=None, label=sys.argv[1], i=i)
print("not reached")
"""


def test_a_process_killed_right_after_commit_leaves_every_row() -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings_postgres",
        "DS_TEST_DB_DEFAULT": connection.settings_dict["NAME"],
        "DS_TEST_DB_OTHER": connections["other"].settings_dict["NAME"],
        "PYTHONPATH": str(ROOT),
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD, "killed"], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert Author.objects.filter(name="killed").exists()  # committed...
    assert labels() == list(range(250))  # ...with every call, for the relay
