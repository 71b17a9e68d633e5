"""Database layer: real transactions (SQLite pass and PostgreSQL pass), ``EAGER`` delivery.

``EAGER`` runs each handler where the broker publish would happen, through the same
JSON encode/decode, so these tests see exactly when a call is released and what it
carries. The worker tests (test_worker.py) prove the same on real brokers.
"""

from __future__ import annotations

import datetime
import logging
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models.signals import post_save
from django.test import override_settings

from deferred_signals import DeferredSignalError, connect, receiver, registry
from deferred_signals.dispatch import PendingCall
from tests.conftest import records, sync_calls
from tests.testapp.handlers import Money, Plain
from tests.testapp.models import Article, Author, Tag, Ticket
from tests.testapp.signals import user_invited, user_registered

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])
UTC = datetime.timezone.utc


def titles(handler: str = "article_saved") -> list[str]:
    return [
        r.call["kwargs"]["instance"]["fields"]["title"]["repr"].strip("'") for r in records(handler)
    ]


# --- when calls are released --------------------------------------------------------------


def test_commit_releases_each_call_once_after_commit() -> None:
    with transaction.atomic():
        Article.objects.create(title="a")
        assert records() == []  # not before commit
        assert sync_calls("article_saved")  # the synchronous twin already ran
    assert titles() == ["a"]
    assert titles("article_snapshot") == ["a"]


def test_rollback_sends_nothing() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Article.objects.create(title="rolled back")
        raise RuntimeError
    assert records() == []
    Article.objects.create(title="next")  # and nothing is left over for the next commit
    assert titles() == ["next"]


def test_rolled_back_savepoint_drops_only_its_own_calls() -> None:
    with transaction.atomic():
        Article.objects.create(title="before")
        try:
            with transaction.atomic():
                Article.objects.create(title="inner")
                with transaction.atomic():
                    Article.objects.create(title="innermost")
                raise RuntimeError
        except RuntimeError:
            pass
        with transaction.atomic():
            Article.objects.create(title="released savepoint")
        Article.objects.create(title="after")
        assert records() == []  # a released savepoint does not release its calls
    assert titles() == ["before", "released savepoint", "after"]


def test_outside_atomic_the_call_is_sent_at_once() -> None:
    Article.objects.create(title="autocommit")
    assert titles() == ["autocommit"]


def test_a_call_waits_for_the_commit_of_its_own_database() -> None:
    with transaction.atomic(using="other"):
        Article.objects.using("other").create(title="on other")
        with transaction.atomic(using="default"):
            Author.objects.create(name="unrelated")
        Article.objects.create(title="on default")  # default is in autocommit: sent at once
        assert titles() == ["on default"]
    assert titles() == ["on default", "on other"]
    assert records()[-1].call["kwargs"]["using"]["repr"] == "'other'"


def test_a_call_on_the_default_database_waits_for_it_not_for_other() -> None:
    with transaction.atomic(using="default"):
        with transaction.atomic(using="other"):
            Article.objects.create(title="default")
        assert records() == []
    assert titles() == ["default"]


def test_using_option_overrides_the_signal_alias() -> None:
    def on_author(sender: Any, **kwargs: Any) -> None:
        Article.objects.create(title=f"author {kwargs['instance'].name}")

    receiver(post_save, sender=Author, defer=True, name="tests.on_author", using="other")(on_author)
    try:
        with transaction.atomic(using="other"):
            Author.objects.create(name="x")  # saved on default, released by other's commit
            assert titles() == []
        assert titles() == ["author x"]
    finally:
        post_save.disconnect(on_author, sender=Author)
        registry.unregister("tests.on_author")


def test_one_transaction_puts_its_calls_in_one_batch() -> None:
    with transaction.atomic():
        for i in range(50):
            Article.objects.create(title=str(i))
        hooks = [hook for _, hook, _ in connection.run_on_commit if isinstance(hook, PendingCall)]
        batches = {id(hook.batch): hook.batch for hook in hooks}
        (batch,) = batches.values()  # one batch for the whole run of calls...
        assert len(batch.calls) == 100  # ...of 2 handlers x 50 saves
        on_commit_seen: list[str] = []
        transaction.on_commit(lambda: on_commit_seen.append("user callback"))
        Article.objects.create(title="after a user callback")
    assert len(titles()) == 51 and on_commit_seen == ["user callback"]


def test_calls_run_in_send_order() -> None:
    with transaction.atomic():
        for title in "abc":
            Article.objects.create(title=title)
            with transaction.atomic():
                Article.objects.create(title=title.upper())
    assert titles() == ["a", "A", "b", "B", "c", "C"]


# --- what the handler receives --------------------------------------------------------------


def test_post_save_handler_sees_what_a_synchronous_one_sees() -> None:
    author = Author.objects.create(name="Ada")
    with transaction.atomic():
        article = Article.objects.create(
            title="t",
            author=author,
            price=Decimal("12.50"),
            published=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            day=datetime.date(2026, 1, 2),
            duration=datetime.timedelta(hours=1),
            data={"a": [1, 2]},
        )
        article.title = "u"
        article.save(update_fields=["title"])
    deferred, sync = [r.call for r in records("article_saved")], sync_calls("article_saved")
    assert deferred[1] == sync[1]
    assert deferred[1]["kwargs"]["update_fields"]["type"] == "frozenset"
    assert "'title'" in deferred[1]["kwargs"]["update_fields"]["items"][0]
    # Fresh (the default): the row as committed, so the first call sees the later title too.
    sync[0]["kwargs"]["instance"]["fields"]["title"]["repr"] = "'u'"
    assert deferred[0] == sync[0]
    assert deferred[0]["kwargs"]["created"] == {"type": "bool", "repr": "True"}


def test_snapshot_handler_sees_values_of_send_time() -> None:
    with transaction.atomic():
        article = Article.objects.create(
            title="first", published=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        )
        article.title = "second"
        article.save()
    snapshots = [r.call for r in records("article_snapshot")]
    assert [s["kwargs"]["instance"]["fields"]["title"]["repr"] for s in snapshots] == [
        "'first'",
        "'second'",
    ]
    assert snapshots == sync_calls("article_saved")


def test_delete_handlers_get_the_snapshot_with_its_pk() -> None:
    article = Article.objects.create(title="doomed", price=Decimal("1.00"))
    pk = article.pk
    with transaction.atomic():
        article.delete()
    assert article.pk is None  # what a commit-time callback would have read
    calls = [r.call for r in records("article_deleted")]
    assert [c["signal"]["name"] for c in calls] == ["pre_delete", "post_delete"]
    assert calls == sync_calls("article_deleted")
    assert calls[1]["kwargs"]["instance"]["pk"]["repr"] == repr(pk)
    assert calls[1]["kwargs"]["origin"]["type"] == "instance:testapp.Article"


def test_m2m_changed_keeps_pk_set_and_model() -> None:
    article = Article.objects.get(pk=Article.objects.create(title="tagged").pk)  # as stored
    tags = [Tag.objects.create(name=n) for n in "xy"]
    with transaction.atomic():
        article.tags.add(*tags)
        article.tags.clear()
    calls = [r.call for r in records("tags_changed")]
    assert calls == sync_calls("tags_changed")
    assert [c["kwargs"]["action"]["repr"] for c in calls] == [
        "'pre_add'",
        "'post_add'",
        "'pre_clear'",
        "'post_clear'",
    ]
    assert calls[1]["kwargs"]["pk_set"]["type"] == "set"
    assert calls[1]["kwargs"]["model"] == {"type": "class", "name": "tests.testapp.models.Tag"}
    assert calls[3]["kwargs"]["pk_set"] == {"type": "NoneType", "repr": "None"}


def test_custom_signals_with_any_sender_and_rich_kwargs() -> None:
    author = Author.objects.create(name="Ada")
    kwargs = {
        "instance": author,
        "when": datetime.datetime(2026, 5, 1, 8, tzinfo=UTC),
        "amount": Decimal("3.14"),
        "money": Money(Decimal("9.99"), "EUR"),
        "labels": {"a", "b"},
        "nested": {"ids": (1, 2), "ok": None, 7: [datetime.date(2026, 1, 1)]},
    }
    with transaction.atomic():
        user_registered.send(sender=Plain, **kwargs)
        user_invited.send(sender=None, **kwargs)
        user_registered.send(sender="a string sender", **kwargs)
    calls = [r.call for r in records("user_event")]
    assert calls == sync_calls("user_event")
    assert [c["signal"]["name"] for c in calls] == [
        "user_registered",
        "user_invited",
        "user_registered",
    ]
    assert calls[0]["sender"] == {"type": "class", "name": "tests.testapp.handlers.Plain"}


def test_async_send_defers_too() -> None:
    with transaction.atomic():
        async_to_sync(user_registered.asend)(sender=Plain, instance=None)
        assert records() == []
    assert len(records("user_event")) == 1


def test_loaddata_is_not_deferred_unless_the_handler_asks() -> None:
    call_command("loaddata", "tickets.json", verbosity=0)
    assert records("article_saved") == []  # raw=True: skipped
    assert sync_calls("article_saved")[0]["kwargs"]["raw"]["repr"] == "True"
    assert len(records("ticket_saved")) == 1  # include_raw=True


# --- rows gone by the time the handler runs ---------------------------------------------------


def test_row_deleted_before_the_handler_runs_is_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="deferred_signals"), transaction.atomic():
        Article.objects.create(title="gone").delete()
    assert records("article_saved") == []
    assert "Skipped deferred handler tests.testapp.handlers.article_saved" in caplog.text
    assert "no longer exists" in caplog.text
    assert titles("article_snapshot") == ["gone"]  # snapshot handlers are not affected


def test_on_missing_raise(caplog: pytest.LogCaptureFixture) -> None:
    handlers = {"tests.testapp.handlers.article_saved": {"on_missing": "raise"}}
    with (
        override_settings(DEFERRED_SIGNALS={"EAGER": True, "HANDLERS": handlers}),
        caplog.at_level(logging.ERROR, logger="deferred_signals"),
        transaction.atomic(),
    ):
        Article.objects.create(title="gone").delete()
    assert records("article_saved") == []
    assert "DoesNotExist" in caplog.text


def test_on_missing_snapshot() -> None:
    with transaction.atomic():
        Ticket.objects.create(subject="short-lived").delete()
    (call,) = [r.call for r in records("ticket_saved")]
    assert call["kwargs"]["instance"]["fields"]["subject"]["repr"] == "'short-lived'"


# --- bad input ------------------------------------------------------------------------------


def test_bad_argument_fails_at_send_time_naming_handler_kwarg_and_type() -> None:
    with pytest.raises(DeferredSignalError) as info, transaction.atomic():
        user_registered.send(sender=Plain, instance=None, payload={"when": object()})
    message = str(info.value)
    assert "'tests.user_event'" in message
    assert "payload['when']" in message
    assert "builtins.object" in message
    assert "register_codec" in message
    assert records() == []


def test_bad_argument_outside_atomic_fails_too() -> None:
    with pytest.raises(DeferredSignalError, match=r"tests\.user_event"):
        user_registered.send(sender=Plain, instance=None, callback=print)


def test_a_handler_connected_between_two_sends_gets_the_second_sends_values() -> None:
    """Regression: the encode-once memo must not outlive a new connection."""
    received: list[str] = []

    def first(sender: Any, instance: Author, **kwargs: Any) -> None:
        received.append(f"first:{instance.name}")

    def second(sender: Any, instance: Author, **kwargs: Any) -> None:
        received.append(f"second:{instance.name}")

    author = Author.objects.create(name="one")
    connect(post_save, first, sender=Author, defer=True, name="tests.first", instance="snapshot")
    try:
        author.name = "two"
        author.save()
        post_save.disconnect(first, sender=Author)
        connect(
            post_save, second, sender=Author, defer=True, name="tests.second", instance="snapshot"
        )
        author.name = "three"
        author.save()
    finally:
        post_save.disconnect(first, sender=Author)
        post_save.disconnect(second, sender=Author)
        registry.unregister("tests.first")
        registry.unregister("tests.second")
    assert received == ["first:two", "second:three"]


def test_async_handlers_are_awaited() -> None:
    seen: list[str] = []

    async def on_registered(sender: Any, instance: Author, **kwargs: Any) -> None:
        seen.append(f"awaited {instance.name}")

    connect(user_registered, on_registered, defer=True, name="tests.async_handler")
    try:
        author = Author.objects.create(name="async")
        with transaction.atomic():
            user_registered.send(sender=Plain, instance=author)
            assert seen == []
    finally:
        user_registered.disconnect(on_registered)
        registry.unregister("tests.async_handler")
    assert seen == ["awaited async"]


# --- review findings ---------------------------------------------------------------------


def test_bulk_delete_with_deferred_delete_handlers() -> None:
    for title in ("q1", "q2", "keep"):
        Article.objects.create(title=title)
    with transaction.atomic():
        deleted, _ = Article.objects.filter(title__startswith="q").delete()
    assert deleted == 2
    assert list(Article.objects.values_list("title", flat=True)) == ["keep"]
    calls = [r.call for r in records("article_deleted")]
    assert len(calls) == 4  # pre_delete and post_delete for each row
    # origin: the QuerySet that started the delete; its rows are gone, so it comes back empty.
    assert {c["kwargs"]["origin"]["repr"] for c in calls} == {"<QuerySet []>"}
    assert {c["kwargs"]["origin"]["type"] for c in calls} == {"QuerySet"}


def test_a_custom_signal_about_a_row_waits_for_the_rows_database() -> None:
    author = Author.objects.using("other").create(name="elsewhere")
    with transaction.atomic(using="other"):
        user_registered.send(sender=Plain, instance=author)
        assert records("user_event") == []  # no `using` kwarg: the instance's database decides
    assert len(records("user_event")) == 1


def test_eager_propagates_raises_the_handlers_exception() -> None:
    from tests.testapp.handlers import FlakyError
    from tests.testapp.signals import flaky_signal

    eager = {"EAGER": True, "EAGER_PROPAGATES": True}
    with (
        override_settings(DEFERRED_SIGNALS=eager),
        pytest.raises(FlakyError),
        transaction.atomic(),
    ):
        flaky_signal.send(sender=None, key="boom", fail_times=1)
    with override_settings(DEFERRED_SIGNALS=eager), pytest.raises(FlakyError):
        flaky_signal.send(sender=None, key="boom-autocommit", fail_times=1)


def test_eager_propagates_raises_the_first_failure_once_the_whole_batch_ran() -> None:
    """A failing handler does not take the calls after it with it, as on a worker: they run,
    and the first exception is raised after them."""
    from tests.testapp.handlers import FlakyError
    from tests.testapp.signals import flaky_signal

    eager = {"EAGER": True, "EAGER_PROPAGATES": True}
    with (
        override_settings(DEFERRED_SIGNALS=eager),
        pytest.raises(FlakyError, match="attempt 1 of first"),
        transaction.atomic(),
    ):
        flaky_signal.send(sender=None, key="first", fail_times=1)
        user_registered.send(sender=None, label="after it")
        flaky_signal.send(sender=None, key="second", fail_times=1)
    from tests.testapp.models import Attempt

    assert len(records("user_event")) == 1
    assert dict(Attempt.objects.values_list("key", "count")) == {"first": 1, "second": 1}


def test_an_instance_read_from_another_database_does_not_release_the_call_early() -> None:
    author = Author.objects.using("other").create(name="read from a replica")
    with transaction.atomic():  # the business transaction, on default
        Author.objects.create(name="order row")
        user_registered.send(sender=Plain, instance=author)
        assert records("user_event") == []
    assert len(records("user_event")) == 1


def test_one_call_failing_in_eager_mode_does_not_drop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from deferred_signals import register_codec, unregister_codec

    class Cursed:
        pass

    def refuse(data: Any) -> Any:
        raise ValueError("cannot decode")

    register_codec(Cursed, name="tests.cursed", encode=lambda value: 0, decode=refuse)
    try:
        with caplog.at_level(logging.ERROR, logger="deferred_signals"), transaction.atomic():
            user_registered.send(sender=Plain, instance=None, n=1)
            user_registered.send(sender=Plain, instance=None, n=2, cursed=Cursed())
            user_registered.send(sender=Plain, instance=None, n=3)
    finally:
        unregister_codec(Cursed)
    assert [r.call["kwargs"]["n"]["repr"] for r in records("user_event")] == ["1", "3"]
    assert "Deferred handler tests.user_event failed (EAGER)" in caplog.text


def test_a_custom_signal_about_a_row_waits_for_both_open_transactions() -> None:
    """The default database's transaction and the row's are both open: the call waits for
    both commits, whichever is last, and for neither once the row's rolls back."""
    with transaction.atomic(using="other"):
        author = Author.objects.using("other").create(name="not committed yet")
        with transaction.atomic():  # the default database's, nested: it commits first
            Author.objects.create(name="business row")
            user_registered.send(sender=Plain, instance=author, step="inner default")
        assert records("user_event") == []  # the row is not committed: no worker sees it
    (first,) = records("user_event")
    instance = first.call["kwargs"]["instance"]
    assert (instance["db"], instance["fields"]["name"]["repr"]) == ("other", "'not committed yet'")

    with transaction.atomic():  # the default database's outside, the row's inside
        with transaction.atomic(using="other"):
            other = Author.objects.using("other").create(name="inner")
            user_registered.send(sender=Plain, instance=other, step="inner other")
        assert len(records("user_event")) == 1
    assert len(records("user_event")) == 2

    with pytest.raises(RuntimeError), transaction.atomic(using="other"):
        gone = Author.objects.using("other").create(name="rolled back")
        with transaction.atomic():
            user_registered.send(sender=Plain, instance=gone, step="rolled back")
        raise RuntimeError
    assert len(records("user_event")) == 2


def test_a_savepoint_of_the_rows_database_rolled_back_keeps_a_call_waiting_for_it() -> None:
    """Both commits happen: a savepoint of the row's transaction rolled back meanwhile does
    not drop the call waiting for that transaction."""
    with transaction.atomic(using="other"):
        author = Author.objects.using("other").create(name="kept")
        with pytest.raises(RuntimeError), transaction.atomic(using="other"):  # a savepoint
            with transaction.atomic():  # the default database's: commits here
                user_registered.send(sender=Plain, instance=author, step="savepoint")
            raise RuntimeError
        assert records("user_event") == []
    assert len(records("user_event")) == 1


@pytest.mark.django_db(databases=["default", "other"])  # a TestCase: its blocks never commit
def test_under_a_testcase_a_call_about_another_databases_row_runs_with_capture_on_commit(
    django_capture_on_commit_callbacks: Any,
) -> None:
    """The testing guide's recipe (EAGER and captureOnCommitCallbacks): the row's database
    is at the test's level, its autocommit, which the call does not wait for."""
    author = Author.objects.using("other").create(name="test row")
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        user_registered.send(sender=Plain, instance=author, step="testcase")
    assert len(records("user_event")) == 1


@pytest.mark.django_db(databases=["default", "other"])  # a TestCase: its blocks never commit
@pytest.mark.parametrize("default_outside", [True, False])
def test_under_a_testcase_a_call_held_for_the_rows_block_runs_once_it_closed(
    django_capture_on_commit_callbacks: Any, default_outside: bool
) -> None:
    """The row's block inside the test closed before the capture runs the callbacks: what is
    left open on that database is the test's own level, which the call does not wait for."""
    author = Author.objects.using("other").create(name="test row")
    first, second = ("default", "other") if default_outside else ("other", "default")
    with (
        django_capture_on_commit_callbacks(execute=True),
        transaction.atomic(using=first),
        transaction.atomic(using=second),
    ):
        user_registered.send(sender=Plain, instance=author, step=first)
    assert len(records("user_event")) == 1
