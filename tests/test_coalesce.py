"""``coalesce=True``: one call per handler, signal, sender and row in a transaction.

Database layer with real transactions and savepoints (``EAGER``: each call runs where the
publish would be, through the JSON encode/decode), then the outbox on a real Redis queue
and a real worker.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import transaction
from django.db.models.signals import post_save
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import connect, registry
from deferred_signals.models import OutboxCall
from tests.conftest import records, require, use_app, wait_for
from tests.testapp.models import Author, Record
from tests.testapp.signals import row_touched
from tests.workers import PUBLISH_REDIS_URL, Worker, make_app

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


def touch(
    author: Author | None, name: str, created: bool = False, update_fields: Any = None
) -> None:
    row_touched.send(
        sender=Author, instance=author, label=name, created=created, update_fields=update_fields
    )


def seen(handler: str = "row_touched") -> list[dict[str, Any]]:
    """Each call the handler received: label, created, update_fields (as sets)."""
    calls = []
    for record in records(handler):
        kwargs = record.call["kwargs"]
        fields = kwargs["update_fields"]
        calls.append(
            {
                "label": kwargs["label"]["repr"].strip("'"),
                "created": kwargs["created"]["repr"] == "True",
                "update_fields": None
                if fields["type"] == "NoneType"
                else {item.split("'")[-2] for item in fields["items"]},
            }
        )
    return calls


# --- the rule -------------------------------------------------------------------------------


def test_ten_calls_for_one_row_become_one_with_the_last_arguments() -> None:
    author = Author.objects.create(name="a")
    with transaction.atomic():
        touch(author, "first", created=True, update_fields=frozenset({"name"}))
        for n in range(8):
            touch(author, f"call {n}", update_fields=frozenset({f"f{n % 3}"}))
        touch(author, "last", update_fields=frozenset({"name"}))
        assert records() == []
    assert seen() == [
        {"label": "last", "created": True, "update_fields": {"name", "f0", "f1", "f2"}}
    ]


def test_update_fields_none_in_any_call_means_every_field() -> None:
    author = Author.objects.create(name="a")
    with transaction.atomic():
        touch(author, "1", update_fields=frozenset({"name"}))
        touch(author, "2", update_fields=None)
        touch(author, "3", update_fields=frozenset({"other"}))
    assert seen() == [{"label": "3", "created": False, "update_fields": None}]


def test_each_row_sender_and_signal_gets_its_own_call() -> None:
    one, two = Author.objects.create(name="1"), Author.objects.create(name="2")
    with transaction.atomic():
        touch(one, "one a")
        touch(two, "two a")
        touch(one, "one b")
        row_touched.send(sender=Record, instance=one, label="other sender", created=False,
                         update_fields=None)  # fmt: skip
        touch(two, "two b")
    assert sorted(call["label"] for call in seen()) == ["one b", "other sender", "two b"]


def test_calls_without_a_saved_instance_are_never_coalesced() -> None:
    with transaction.atomic():
        touch(None, "no instance 1")
        touch(None, "no instance 2")
        touch(Author(name="unsaved"), "unsaved 1")
        touch(Author(name="unsaved"), "unsaved 2")
    assert [call["label"] for call in seen()] == [
        "no instance 1",
        "no instance 2",
        "unsaved 1",
        "unsaved 2",
    ]


def test_outside_a_transaction_each_call_goes_at_once() -> None:
    author = Author.objects.create(name="a")
    touch(author, "1")
    touch(author, "2")
    assert [call["label"] for call in seen()] == ["1", "2"]


# --- savepoints and rollbacks ---------------------------------------------------------------


def test_a_rolled_back_later_call_leaves_the_earlier_one() -> None:
    author = Author.objects.create(name="a")
    with transaction.atomic():
        touch(author, "kept", created=True, update_fields=frozenset({"name"}))
        with pytest.raises(RuntimeError), transaction.atomic():
            touch(author, "rolled back", update_fields=frozenset({"gone"}))
            raise RuntimeError
    assert seen() == [{"label": "kept", "created": True, "update_fields": {"name"}}]


def test_a_rolled_back_call_in_the_middle_is_left_out_of_the_merge() -> None:
    author = Author.objects.create(name="a")
    with transaction.atomic():
        touch(author, "first", update_fields=frozenset({"a"}))
        with pytest.raises(RuntimeError), transaction.atomic():
            touch(author, "rolled back", created=True, update_fields=frozenset({"b"}))
            with transaction.atomic():
                touch(author, "rolled back too", update_fields=frozenset({"b2"}))
            raise RuntimeError
        with transaction.atomic():
            touch(author, "released savepoint", update_fields=frozenset({"c"}))
        touch(author, "last", update_fields=frozenset({"d"}))
    assert seen() == [{"label": "last", "created": False, "update_fields": {"a", "c", "d"}}]


def test_only_calls_in_a_rolled_back_savepoint_send_nothing() -> None:
    author = Author.objects.create(name="a")
    with transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():
            touch(author, "1")
            touch(author, "2")
            raise RuntimeError
        Author.objects.create(name="unrelated")
    assert seen() == []


def test_a_rolled_back_transaction_sends_nothing_and_leaves_nothing_behind() -> None:
    author = Author.objects.create(name="a")
    with pytest.raises(RuntimeError), transaction.atomic():
        touch(author, "rolled back", created=True, update_fields=frozenset({"x"}))
        raise RuntimeError
    with transaction.atomic():
        touch(author, "next", update_fields=frozenset({"y"}))
    assert seen() == [{"label": "next", "created": False, "update_fields": {"y"}}]


def test_a_savepoint_rollback_after_the_last_call_keeps_the_earlier_ones() -> None:
    author = Author.objects.create(name="a")
    with transaction.atomic():
        touch(author, "1", update_fields=frozenset({"a"}))
        with transaction.atomic():
            touch(author, "2", update_fields=frozenset({"b"}))
        with pytest.raises(RuntimeError), transaction.atomic():
            touch(author, "3", update_fields=frozenset({"c"}))
            raise RuntimeError
        Author.objects.create(name="more work after it")
    assert seen() == [{"label": "2", "created": False, "update_fields": {"a", "b"}}]


def test_post_save_ten_saves_one_call() -> None:
    """The case coalescing is for: a row saved again and again in one request."""

    def saved(sender: Any, **kwargs: Any) -> None:
        Record.objects.create(
            handler="author_saved",
            call={"name": kwargs["instance"].name, "created": kwargs["created"]},
            pid=0,
            ran_at=time.time(),
        )

    connect(post_save, saved, sender=Author, defer=True, name="tests.author_saved", coalesce=True)
    try:
        with transaction.atomic():
            author = Author.objects.create(name="0")
            for n in range(1, 10):
                author.name = str(n)
                author.save()
        (call,) = [record.call for record in records("author_saved")]
        # Fresh: the worker reads the committed row; created: the first save created it.
        assert call == {"name": "9", "created": True}
    finally:
        post_save.disconnect(saved, sender=Author)
        registry.unregister("tests.author_saved")


def test_coalesce_is_a_handler_option_in_settings(settings: SettingsWrapper) -> None:
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "HANDLERS": {"tests.testapp.handlers.row_touched": {"coalesce": False}},
    }
    author = Author.objects.create(name="a")
    with transaction.atomic():
        touch(author, "1")
        touch(author, "2")
    assert [call["label"] for call in seen()] == ["1", "2"]


# --- the outbox and a real broker -------------------------------------------------------------


@contextmanager
def publishing_to_redis(settings: SettingsWrapper, **extra: Any) -> Iterator[tuple[Any, str]]:
    require("redis")
    import redis

    url = PUBLISH_REDIS_URL
    queue = f"ds-coalesce-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    try:
        with use_app(make_app("coalesce", url), settings, queue):
            settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, **extra}
            yield client, queue
    finally:
        client.delete(queue)


def test_outbox_mode_keeps_one_row_per_row_and_publishes_one_message(
    settings: SettingsWrapper,
) -> None:
    author = Author.objects.create(name="a")
    with publishing_to_redis(settings, DELIVERY="outbox") as (client, queue):
        with transaction.atomic():
            touch(author, "first", created=True, update_fields=frozenset({"a"}))
            with pytest.raises(RuntimeError), transaction.atomic():
                touch(author, "rolled back", update_fields=frozenset({"b"}))
                raise RuntimeError
            touch(author, "last", update_fields=frozenset({"c"}))
            (row,) = OutboxCall.objects.all()  # never one row per call
            kwargs = json.loads(row.body)["kwargs"]
            assert kwargs["label"] == "last" and kwargs["created"] is True
        messages = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    (message,) = messages
    assert message["headers"]["id"] == row.id  # the row's call id, for the relay and dedup
    assert not OutboxCall.objects.exists()  # deleted with the batch


def test_outbox_row_of_a_rolled_back_first_call_goes_with_it(settings: SettingsWrapper) -> None:
    author = Author.objects.create(name="a")
    with publishing_to_redis(settings, DELIVERY="outbox") as (client, queue):
        with transaction.atomic():
            with pytest.raises(RuntimeError), transaction.atomic():
                touch(author, "rolled back")
                raise RuntimeError
            touch(author, "kept")
            (row,) = OutboxCall.objects.all()
            assert json.loads(row.body)["kwargs"]["label"] == "kept"
        assert client.llen(queue) == 1
    assert not OutboxCall.objects.exists()


@contextmanager
def deferred_ids() -> Iterator[list[str]]:
    """The call id of each ``call_deferred`` sent meanwhile, in order."""
    from deferred_signals import signals

    ids: list[str] = []

    def deferred(sender: Any, call_id: str, **kwargs: Any) -> None:
        ids.append(call_id)

    signals.call_deferred.connect(deferred, weak=False)
    try:
        yield ids
    finally:
        signals.call_deferred.disconnect(deferred)


def test_outbox_mode_defers_each_call_of_a_group_under_its_rows_id(
    settings: SettingsWrapper,
) -> None:
    author = Author.objects.create(name="a")
    with publishing_to_redis(settings, DELIVERY="outbox") as (client, queue):
        with deferred_ids() as ids, transaction.atomic():
            with pytest.raises(RuntimeError), transaction.atomic():
                touch(author, "first, rolled back")
                raise RuntimeError
            touch(author, "a new group")
            with pytest.raises(RuntimeError), transaction.atomic():
                touch(author, "joins, then rolled back")
                raise RuntimeError
            touch(author, "last")
            (row,) = OutboxCall.objects.all()
        (raw,) = client.lrange(queue, 0, -1)
    # The rolled-back first call's group went with it: the next call started another.
    assert ids[0] != row.id
    assert ids[1:] == [row.id] * 3
    assert json.loads(raw)["headers"]["id"] == row.id


def test_calls_outside_a_transaction_get_ids_of_their_own() -> None:
    author = Author.objects.create(name="a")
    with deferred_ids() as ids:
        touch(author, "1")
        touch(author, "2")
    assert len(set(ids)) == 2
    assert [call["label"] for call in seen()] == ["1", "2"]


def test_outbox_mode_rewrites_a_row_still_waiting_to_be_written(
    settings: SettingsWrapper, postgres_only: None
) -> None:
    """After a transaction's first outbox row, rows wait for the next statement: a later
    call of the group rewrites the waiting row, and the table only ever sees the merge."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.testapp.signals import user_registered

    author = Author.objects.create(name="a")
    table = OutboxCall._meta.db_table
    with publishing_to_redis(settings, DELIVERY="outbox") as (client, queue):
        with CaptureQueriesContext(connection) as captured, transaction.atomic():
            user_registered.send(sender=None, i=0)  # the transaction's first row: at once
            touch(author, "first", created=True, update_fields=frozenset({"a"}))
            touch(author, "second", update_fields=frozenset({"b"}))
            touch(author, "last", update_fields=frozenset({"c"}))
            (row,) = OutboxCall.objects.filter(handler__endswith="row_touched")
        messages = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    body = json.loads(row.body)["kwargs"]
    assert body["label"] == "last" and body["created"] is True
    assert sorted(body["update_fields"]["v"]) == ["a", "b", "c"]
    statements = [query["sql"] for query in captured.captured_queries]
    assert not [sql for sql in statements if sql.startswith(f'UPDATE "{table}"')]
    assert len([sql for sql in statements if sql.startswith(f'INSERT INTO "{table}"')]) == 2
    assert len(messages) == 2  # user_event, and one for the three coalesced calls
    assert not OutboxCall.objects.exists()


def test_ten_calls_publish_exactly_one_message(settings: SettingsWrapper) -> None:
    author = Author.objects.create(name="a")
    with publishing_to_redis(settings) as (client, queue):
        with transaction.atomic():
            for n in range(10):
                touch(author, str(n))
        assert client.llen(queue) == 1


@pytest.mark.worker
def test_a_real_worker_runs_ten_coalesced_calls_once(deferred_to: Worker) -> None:
    author = Author.objects.create(name=uuid.uuid4().hex)
    with transaction.atomic():
        touch(author, "first", created=True, update_fields=frozenset({"name"}))
        for n in range(8):
            touch(author, f"call {n}", update_fields=frozenset({f"f{n}"}))
        touch(author, "last", update_fields=frozenset({"name"}))
    wait_for(lambda: records("row_touched"), what="the coalesced call")
    time.sleep(1.0)  # a second call would land now
    (call,) = seen()
    assert call == {
        "label": "last",
        "created": True,
        "update_fields": {"name", *(f"f{n}" for n in range(8))},
    }
    (record,) = records("row_touched")
    assert record.call["kwargs"]["instance"]["pk"]["repr"] == repr(author.pk)
