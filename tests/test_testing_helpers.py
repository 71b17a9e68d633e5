"""The testing helpers: pytest's ``deferred`` fixture and ``capture_deferred()``.

Under ``db`` (and Django's ``TestCase``) the test's transaction never commits: a call counts
when made outside the test's own atomic blocks, or when its outermost block exits without
rolling back. Under ``transactional_db`` it counts at the real commit. Either way it is
captured instead of published (or run with ``EAGER``, on in these settings): nothing runs
until ``deferred.run()``. Runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_delete
from django.dispatch import Signal
from django.test import TestCase
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import DeferredSignalError, connect, registry, testing
from deferred_signals.models import OutboxCall
from deferred_signals.testing import DeferredCapture, capture_deferred
from tests.conftest import records
from tests.testapp import handlers
from tests.testapp.handlers import FlakyError, Money, Plain
from tests.testapp.models import Article, Attempt, Author
from tests.testapp.signals import flaky_signal, row_touched, user_registered

ARTICLE_SAVED = "tests.testapp.handlers.article_saved"
ROOT = Path(__file__).resolve().parent.parent


def titles(deferred: DeferredCapture, handler: str = ARTICLE_SAVED) -> list[str]:
    return [call.kwargs["instance"].title for call in deferred.calls if call.handler == handler]


def labels(deferred: DeferredCapture) -> list[str]:
    return [call.kwargs["label"] for call in deferred.calls if call.handler == "tests.user_event"]


class Boom(Exception):
    pass


# --- db: the test's transaction never commits ---------------------------------------------


def test_a_call_outside_atomic_blocks_counts_at_once(db: None, deferred: DeferredCapture) -> None:
    article = Article.objects.create(title="a")
    call = deferred.assert_deferred(
        handlers.article_saved, sender=Article, instance=article, created=True
    )
    assert call.handler == ARTICLE_SAVED
    assert call.signal is post_save and call.sender is Article
    assert call.kwargs["instance"] is not article  # decoded from the message, a row of its own
    assert call.kwargs["update_fields"] is None and call.kwargs["raw"] is False
    assert [c.handler for c in deferred.calls] == [
        ARTICLE_SAVED,
        "tests.testapp.handlers.article_snapshot",
    ]
    assert records() == []  # captured, not run (EAGER is on in these settings)


def test_calls_in_atomic_blocks_count_when_the_outermost_exits(
    db: None, deferred: DeferredCapture
) -> None:
    with transaction.atomic():
        Article.objects.create(title="outer")
        with transaction.atomic():
            Article.objects.create(title="inner")
        assert deferred.calls == []  # the inner block's exit is not a commit
        with transaction.atomic(savepoint=False):
            Article.objects.create(title="no savepoint")
        assert deferred.calls == []
    assert titles(deferred) == ["outer", "inner", "no savepoint"]


def test_a_delete_counts_when_its_own_atomic_block_exits(
    db: None, deferred: DeferredCapture
) -> None:
    article = Article.objects.create(title="gone")
    pk = article.pk
    article.delete()  # post_delete is sent inside the deletion's atomic block
    pre, post = [call for call in deferred.calls if call.handler.endswith("article_deleted")]
    assert (pre.signal, post.signal) == (pre_delete, post_delete)
    assert post.kwargs["instance"].pk == pk  # a snapshot, with its pk


def test_calls_made_at_the_tests_level_count_before_a_later_block(
    db: None, deferred: DeferredCapture
) -> None:
    user_registered.send(sender=None, label="before")
    with transaction.atomic():
        user_registered.send(sender=None, label="inside")
        assert labels(deferred) == ["before"]
    user_registered.send(sender=None, label="after")
    assert labels(deferred) == ["before", "inside", "after"]


def test_a_rolled_back_block_is_never_captured(db: None, deferred: DeferredCapture) -> None:
    with pytest.raises(Boom), transaction.atomic():
        Article.objects.create(title="rolled back")
        with transaction.atomic():
            Article.objects.create(title="its inner block")
        raise Boom
    deferred.assert_not_deferred(handlers.article_saved)
    assert deferred.calls == []
    Article.objects.create(title="next")  # nothing left over for the next call either
    assert titles(deferred) == ["next"]


def test_a_rolled_back_savepoint_drops_only_its_own_calls(
    db: None, deferred: DeferredCapture
) -> None:
    with transaction.atomic():
        Article.objects.create(title="kept")
        with pytest.raises(Boom), transaction.atomic():
            Article.objects.create(title="dropped")
            raise Boom
        Article.objects.create(title="after")
    assert titles(deferred) == ["kept", "after"]


def test_a_failed_block_without_savepoint_drops_its_calls(
    db: None, deferred: DeferredCapture
) -> None:
    Article.objects.create(title="before")
    # Django batches both calls together (same savepoints); only the first one committed.
    user_registered.send(sender=None, label="before")
    with pytest.raises(Boom), transaction.atomic(savepoint=False):
        user_registered.send(sender=None, label="doomed")
        raise Boom
    assert labels(deferred) == ["before"]
    # The transaction is broken now (the fresh row cannot be read), yet a failing assertion
    # still lists what was deferred.
    with pytest.raises(AssertionError, match=r"article_saved\(\{.*\(not decodable here: "):
        deferred.assert_not_deferred(handlers.article_saved)


def test_an_error_caught_inside_a_block_still_rolls_it_back(
    db: None, deferred: DeferredCapture
) -> None:
    with transaction.atomic(savepoint=False):
        user_registered.send(sender=None, label="doomed")
        try:
            with transaction.atomic(savepoint=False):
                raise Boom
        except Boom:
            pass  # the transaction is marked for rollback all the same
    assert deferred.calls == []


def test_an_atomic_decorator_and_a_durable_block_count_at_their_exit(
    db: None, deferred: DeferredCapture
) -> None:
    @transaction.atomic
    def sign_up() -> None:
        Article.objects.create(title="decorated")
        assert deferred.calls == []

    sign_up()
    with transaction.atomic(durable=True):  # allowed directly inside a test's transaction
        Article.objects.create(title="durable")
        assert titles(deferred) == ["decorated"]
    assert titles(deferred) == ["decorated", "durable"]


@pytest.mark.django_db(databases=["default", "other"])
def test_each_database_counts_its_own_blocks(deferred: DeferredCapture) -> None:
    with transaction.atomic(using="other"):
        Article.objects.using("other").create(title="other")
        with transaction.atomic():  # the default database's block exits: not other's commit
            pass
        assert deferred.calls == []
    with pytest.raises(Boom), transaction.atomic(using="other"):
        Article.objects.using("other").create(title="rolled back")
        raise Boom
    (call,) = [call for call in deferred.calls if call.handler == ARTICLE_SAVED]
    assert call.kwargs["instance"].title == "other"
    assert call.kwargs["instance"]._state.db == "other"


def test_the_fixture_may_come_before_db(deferred: DeferredCapture, db: None) -> None:
    with transaction.atomic():
        Article.objects.create(title="a")
        assert deferred.calls == []
    assert titles(deferred) == ["a"]


def test_calls_made_before_the_capture_are_not_captured(db: None) -> None:
    Article.objects.create(title="before")  # e.g. made in setUp
    with capture_deferred() as deferred:
        Article.objects.create(title="inside")
    assert titles(deferred) == ["inside"]
    Article.objects.create(title="after")  # the capture is over: nothing more is captured
    assert titles(deferred) == ["inside"]


# --- what a call carries --------------------------------------------------------------------


def test_kwargs_are_decoded_as_a_worker_decodes_them(db: None, deferred: DeferredCapture) -> None:
    when = datetime.datetime(2026, 11, 3, 12, 30, tzinfo=datetime.timezone.utc)
    user_registered.send(
        sender=Plain,
        money=Money(Decimal("9.90"), "EUR"),
        tags={"a", "b"},
        pair=(1, 2),
        by_id={1: "one"},
        when=when,
    )
    call = deferred.assert_deferred("tests.user_event", sender=Plain, by_id={1: "one"})
    kwargs = call.kwargs
    assert kwargs["money"] == Money(Decimal("9.90"), "EUR")
    assert type(kwargs["money"].amount) is Decimal
    assert kwargs["tags"] == {"a", "b"} and type(kwargs["tags"]) is set
    assert kwargs["pair"] == (1, 2) and type(kwargs["pair"]) is tuple
    assert kwargs["when"] == when
    assert call.signal is user_registered
    assert repr(call) == f"<CapturedCall tests.user_event [{call.id}]>"
    assert "tests.money" in call.message  # the JSON a worker would receive


def test_instances_are_fresh_rows_or_snapshots_as_on_the_worker(
    db: None, deferred: DeferredCapture
) -> None:
    article = Article.objects.create(title="saved")
    article.save(update_fields=["title"])
    article.title = "only in memory"
    fresh, update = [call for call in deferred.calls if call.handler == ARTICLE_SAVED]
    assert fresh.kwargs["instance"].title == "saved"  # read from the database
    assert update.kwargs["update_fields"] == frozenset({"title"})
    Article.objects.filter(pk=article.pk).update(title="updated later")
    snapshot = deferred.assert_deferred(handlers.article_snapshot, created=True)
    assert snapshot.kwargs["instance"].title == "saved"  # as sent


def test_a_row_deleted_before_decoding_comes_back_with_its_pk(
    db: None, deferred: DeferredCapture
) -> None:
    with transaction.atomic():
        article = Article.objects.create(title="short-lived")
        Article.objects.filter(pk=article.pk).delete()
    call = deferred.assert_deferred(handlers.article_saved, instance=article)
    assert call.kwargs["instance"]._state.adding  # not a row: the worker would skip the call


def test_reading_a_deleted_rows_call_logs_no_skip_running_it_does(
    db: None, deferred: DeferredCapture, caplog: pytest.LogCaptureFixture
) -> None:
    with transaction.atomic():
        article = Article.objects.create(title="short-lived")
        Article.objects.filter(pk=article.pk).delete()
    skipped = f"Skipped deferred handler {ARTICLE_SAVED}: "
    with caplog.at_level(logging.WARNING, logger="deferred_signals"):
        call = deferred.assert_deferred(handlers.article_saved, instance=article)
        assert call.kwargs["instance"].pk == article.pk
        assert skipped not in caplog.text  # only the arguments were read
        deferred.run()
    assert caplog.text.count(skipped) == 1


# --- assertions --------------------------------------------------------------------------


def test_assertions_take_the_function_or_its_registered_name(
    db: None, deferred: DeferredCapture
) -> None:
    user_registered.send(sender=None, label="x")
    assert deferred.assert_deferred(handlers.user_event, label="x").kwargs == {"label": "x"}
    deferred.assert_deferred("tests.user_event")
    deferred.assert_not_deferred(handlers.article_saved)
    deferred.assert_not_deferred(ARTICLE_SAVED)


class Counter:
    def count(self, sender: object, **kwargs: object) -> None:
        pass


def test_assertions_take_a_bound_method(db: None, deferred: DeferredCapture) -> None:
    signal, counter = Signal(), Counter()
    connect(signal, counter.count, defer=True)
    try:
        signal.send(sender=None, n=1)
        assert deferred.assert_deferred(counter.count, n=1).handler == f"{__name__}.Counter.count"
    finally:
        signal.disconnect(counter.count)
        registry.unregister(f"{__name__}.Counter.count")


def test_a_failing_assertion_lists_what_was_deferred_instead(
    db: None, deferred: DeferredCapture
) -> None:
    with pytest.raises(AssertionError, match=r"No deferred call of .*Nothing was deferred"):
        deferred.assert_deferred(handlers.article_saved)
    article = Article.objects.create(title="a")
    with pytest.raises(AssertionError) as failed:
        deferred.assert_deferred(handlers.article_saved, created=False)
    message = str(failed.value)
    assert message.startswith(f"No deferred call of {ARTICLE_SAVED} with created=False. ")
    assert "Deferred instead:\n" in message
    assert f"  - {ARTICLE_SAVED}(sender=<class 'tests.testapp.models.Article'>, " in message
    assert f"instance={article!r}, created=True" in message
    assert "tests.testapp.handlers.article_snapshot(" in message
    with pytest.raises(AssertionError, match=r"was deferred 1 time\(s\), expected never"):
        deferred.assert_not_deferred(handlers.article_saved)


def test_only_deferred_handlers_can_be_asserted(deferred: DeferredCapture) -> None:
    with pytest.raises(DeferredSignalError, match="is not a deferred handler"):
        deferred.assert_deferred(handlers.article_saved_sync)
    with pytest.raises(DeferredSignalError, match=r"'tests\.typo' is not a deferred handler"):
        deferred.assert_not_deferred("tests.typo")  # a typo would pass silently otherwise


# --- run() ---------------------------------------------------------------------------------


def test_run_runs_the_captured_calls_here_once(db: None, deferred: DeferredCapture) -> None:
    Article.objects.create(title="a")
    ran = deferred.run()
    assert [call.handler for call in ran] == [c.handler for c in deferred.calls]
    (record,) = records("article_saved")
    assert record.call["kwargs"]["instance"]["fields"]["title"]["repr"] == "'a'"
    assert record.call["kwargs"]["created"] == {"type": "bool", "repr": "True"}
    assert record.pid == os.getpid()
    assert deferred.run() == []  # nothing runs twice
    Article.objects.create(title="b")
    assert [call.kwargs["instance"].title for call in deferred.run()] == ["b", "b"]
    assert len(records("article_saved")) == 2


def test_run_lets_a_handlers_exception_propagate(db: None, deferred: DeferredCapture) -> None:
    flaky_signal.send(sender=None, key="k", fail_times=1)
    with pytest.raises(FlakyError, match="attempt 1 of k"):
        deferred.run()  # no retries here: the test sees the failure
    assert Attempt.objects.get(key="k").count == 1


# --- transactional_db: real commits -------------------------------------------------------


ROW_TOUCHED = "tests.testapp.handlers.row_touched"


def touched(deferred: DeferredCapture) -> list[tuple[str, bool, object]]:
    """Each captured call of the coalescing handler: label, created, update_fields."""
    return [
        (call.kwargs["label"], call.kwargs["created"], call.kwargs["update_fields"])
        for call in deferred.calls
        if call.handler == ROW_TOUCHED
    ]


def touch(author: Author, label: str, created: bool = False, fields: object = None) -> None:
    row_touched.send(
        sender=Author, instance=author, label=label, created=created, update_fields=fields
    )


def test_coalesced_calls_count_when_the_outermost_block_exits(
    db: None, deferred: DeferredCapture
) -> None:
    author = Author.objects.create(name="a")
    with transaction.atomic():
        touch(author, "first", created=True, fields=frozenset({"name"}))
        with pytest.raises(Boom), transaction.atomic():
            touch(author, "rolled back", fields=frozenset({"gone"}))
            raise Boom
        touch(author, "last", fields=frozenset({"bio"}))
        assert touched(deferred) == []  # not committed yet
    # One call, merged by the documented rule, as the commit would publish it.
    assert touched(deferred) == [("last", True, frozenset({"name", "bio"}))]
    (call,) = [call for call in deferred.calls if call.handler == ROW_TOUCHED]
    with transaction.atomic():
        touch(author, "next transaction")
    assert touched(deferred)[1:] == [("next transaction", False, None)]
    first, second = (c.id for c in deferred.calls if c.handler == ROW_TOUCHED)
    assert first == call.id != second  # a group per transaction, an id per group


def test_coalesced_calls_at_the_tests_level_count_one_by_one(
    db: None, deferred: DeferredCapture
) -> None:
    """The test's own level stands for autocommit, where nothing is coalesced."""
    author = Author.objects.create(name="a")
    touch(author, "1")
    touch(author, "2")
    assert touched(deferred) == [("1", False, None), ("2", False, None)]
    calls = [call for call in deferred.calls if call.handler == ROW_TOUCHED]
    assert calls[0].id != calls[1].id
    deferred.run()
    assert len(records("row_touched")) == 2


def test_a_rolled_back_block_of_coalesced_calls_is_never_captured(
    db: None, deferred: DeferredCapture
) -> None:
    author = Author.objects.create(name="a")
    with pytest.raises(Boom), transaction.atomic():
        touch(author, "1")
        touch(author, "2")
        raise Boom
    assert touched(deferred) == []
    with transaction.atomic():
        touch(author, "after")
    assert touched(deferred) == [("after", False, None)]


def test_coalesced_calls_count_at_commit_under_transactional_db(
    transactional_db: None, deferred: DeferredCapture
) -> None:
    author = Author.objects.create(name="a")
    with transaction.atomic():
        for n in range(5):
            touch(author, str(n), fields=frozenset({f"f{n}"}))
    assert touched(deferred) == [("4", False, frozenset(f"f{n}" for n in range(5)))]


def test_calls_count_at_commit_under_transactional_db(
    transactional_db: None, deferred: DeferredCapture
) -> None:
    Article.objects.create(title="autocommit")
    assert titles(deferred) == ["autocommit"]
    with transaction.atomic():
        Article.objects.create(title="committed")
        with pytest.raises(Boom), transaction.atomic():
            Article.objects.create(title="savepoint rolled back")
            raise Boom
        assert titles(deferred) == ["autocommit"]
    with pytest.raises(Boom), transaction.atomic():
        Article.objects.create(title="rolled back")
        raise Boom
    assert titles(deferred) == ["autocommit", "committed"]
    assert records() == []
    deferred.run()
    assert len(records("article_saved")) == 2


def test_after_the_capture_calls_are_delivered_as_usual(transactional_db: None) -> None:
    with capture_deferred() as deferred:
        Article.objects.create(title="captured")
    Article.objects.create(title="delivered")  # EAGER, as configured
    assert titles(deferred) == ["captured"]
    assert [
        r.call["kwargs"]["instance"]["fields"]["title"]["repr"] for r in records("article_saved")
    ] == ["'delivered'"]


def test_captured_outbox_calls_leave_no_outbox_row(
    transactional_db: None, settings: SettingsWrapper, deferred: DeferredCapture
) -> None:
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "EAGER": False, "DELIVERY": "outbox"}
    with transaction.atomic():
        Article.objects.create(title="a")
        assert OutboxCall.objects.count() == 2  # written with the transaction, as configured
    assert titles(deferred) == ["a"]
    assert OutboxCall.objects.count() == 0  # captured means delivered: no relay sends it


# --- one capture at a time; Django's TestCase ---------------------------------------------


def test_one_capture_at_a_time(deferred: DeferredCapture) -> None:
    with pytest.raises(DeferredSignalError, match="already being captured"), capture_deferred():
        pass


class CaptureInDjangoTestCase(TestCase):
    """``capture_deferred()`` in a ``TestCase``, whose transaction never commits."""

    def setUp(self) -> None:
        self.deferred = capture_deferred()
        self.deferred.start()
        self.addCleanup(self.deferred.stop)

    def test_calls_count_as_in_the_db_fixture(self) -> None:
        Article.objects.create(title="a")
        with transaction.atomic():
            Article.objects.create(title="b")
            self.assertEqual(titles(self.deferred), ["a"])
        with self.assertRaises(Boom), transaction.atomic():
            Article.objects.create(title="rolled back")
            raise Boom
        self.assertEqual(titles(self.deferred), ["a", "b"])
        self.deferred.assert_deferred(handlers.article_saved, created=True)
        self.assertEqual(len(self.deferred.run()), 4)
        self.assertEqual(len(records("article_saved")), 2)

    def test_a_with_block(self) -> None:
        self.deferred.stop()
        with capture_deferred() as deferred:
            user_registered.send(sender=None, label="x")
        deferred.assert_deferred(handlers.user_event, label="x")
        deferred.assert_not_deferred(handlers.article_saved)


class CaptureInAnAsyncTest(TestCase):
    """An ``async def`` test runs in an event loop thread; the ORM, through ``sync_to_async``,
    on the test's own thread, where the calls made at the test's level wait. Read from the
    loop's thread the capture would miss them: it refuses, and says to use sync_to_async."""

    def setUp(self) -> None:
        self.deferred = capture_deferred()
        self.deferred.start()
        self.addCleanup(self.deferred.stop)

    async def test_the_capture_is_read_through_sync_to_async(self) -> None:
        await Article.objects.acreate(title="async")
        with self.assertRaisesMessage(DeferredSignalError, "sync_to_async"):
            self.deferred.assert_not_deferred(handlers.article_saved)
        with self.assertRaisesMessage(DeferredSignalError, "sync_to_async"):
            self.deferred.calls  # noqa: B018
        call = await sync_to_async(self.deferred.assert_deferred)(
            handlers.article_saved, created=True
        )
        self.assertEqual(call.kwargs["instance"].title, "async")
        with self.assertRaisesMessage(DeferredSignalError, "sync_to_async"):
            self.deferred.stop()
        self.assertIsNone(testing._active)  # stopped all the same


def test_an_event_loop_in_the_tests_own_thread_is_refused_too(
    db: None, deferred: DeferredCapture
) -> None:
    """Django's connections are per context in async code, even in the test's thread: a
    loop there does not see the test's connection and its calls either."""
    Article.objects.create(title="unseen from a loop")

    async def read() -> list[str]:
        return [call.handler for call in deferred.calls]

    with pytest.raises(DeferredSignalError, match="sync_to_async"):
        asyncio.run(read())
    assert [call.handler for call in deferred.calls].count(ARTICLE_SAVED) == 1


class StartInAnAsyncTest(TestCase):
    async def test_a_capture_is_not_started_in_an_async_context(self) -> None:
        with (
            self.assertRaisesMessage(DeferredSignalError, "sync_to_async"),
            capture_deferred(),
        ):
            await user_registered.asend(sender=None, label="x")
        self.assertIsNone(testing._active)


# --- the pytest plugin ------------------------------------------------------------------------


def test_the_plugin_is_an_entry_point_that_imports_no_django() -> None:
    (plugin,) = [ep for ep in entry_points(group="pytest11") if ep.name == "deferred_signals"]
    assert plugin.value == "deferred_signals.pytest_plugin"
    code = (
        "import sys, deferred_signals.pytest_plugin\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'celery')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"


def test_the_plugin_is_harmless_without_django(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_plain.py").write_text(
        textwrap.dedent(
            """
            import sys

            def test_plain():
                assert "django" not in sys.modules
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    command = [sys.executable, "-m", "pytest", "-p", "no:django", "-p", "no:cacheprovider"]
    result = subprocess.run([*command, "-q"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = subprocess.run(
        [*command, "--fixtures"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert "deferred -- " in listed.stdout, listed.stdout


@pytest.mark.django_db
def test_capturing_needs_no_broker(settings: SettingsWrapper) -> None:
    """A project's tests may have no broker configured: captured calls are never published."""
    from celery import Celery
    from celery import _state as celery_state

    from deferred_signals import DeferredSignalConfigError
    from tests.testapp.signals import user_registered

    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "EAGER": False}
    bare = Celery("no-broker", set_as_current=False)
    previous = celery_state.get_current_app()
    bare.set_current()
    try:
        with pytest.raises(DeferredSignalConfigError, match="has no broker_url"):
            user_registered.send(sender=None, label="uncaptured")
        with capture_deferred() as captured:
            user_registered.send(sender=None, label="captured")
        captured.assert_deferred("tests.user_event", label="captured")
    finally:
        previous.set_current()
