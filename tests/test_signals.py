"""Our own signals: each sent once, where its event happens, with the documented arguments.

Request side on the in-memory broker (and a refused one for spills), worker side through
Celery's ``Task.apply``; the tracing test (test_tracing.py) and the real-worker tests cover
the same code in a worker process.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging.config
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from celery import current_app
from django.db import DatabaseError, transaction
from django.db.models.query import QuerySet
from django.test import override_settings
from pytest_django.fixtures import Settings as SettingsWrapper

import deferred_signals
from deferred_signals import registry, signals
from deferred_signals.execution import decode_call
from deferred_signals.models import OutboxCall
from tests.conftest import use_app
from tests.testapp import handlers
from tests.testapp.handlers import FlakyError
from tests.testapp.models import Article
from tests.testapp.signals import counted_signal, user_registered
from tests.workers import make_app

pytestmark = pytest.mark.django_db(transaction=True)

USER_EVENT = "tests.user_event"
FLAKY = "tests.testapp.handlers.flaky"
DB_FLAKY = "tests.testapp.handlers.db_flaky"


@dataclass
class Event:
    name: str
    sender: Any
    kwargs: dict[str, Any]


@contextmanager
def recording(sender: Any = None) -> Iterator[list[Event]]:
    """Every signal of ours sent meanwhile (for ``sender`` only, if given), in order."""
    events: list[Event] = []
    connected: list[tuple[Any, Callable[..., None]]] = []
    for name in signals.__all__:
        signal = getattr(signals, name)

        def receive(sender: Any, signal: Any, _name: str = name, **kwargs: Any) -> None:
            events.append(Event(_name, sender, kwargs))

        signal.connect(receive, sender=sender, weak=False)
        connected.append((signal, receive))
    try:
        yield events
    finally:
        for signal, receive in connected:
            signal.disconnect(receive, sender=sender)


def names(events: list[Event]) -> list[str]:
    return [event.name for event in events]


@pytest.fixture
def memory_broker(settings: SettingsWrapper) -> None:
    """Publish for real, to the test app's in-memory broker."""
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "EAGER": False,
        "DEFAULTS": {"queue": f"ds-signals-{uuid.uuid4().hex[:8]}"},
    }


def test_the_signals_are_exported() -> None:
    assert "signals" in deferred_signals.__all__
    assert deferred_signals.signals is signals
    for name in signals.__all__:
        assert getattr(signals, name).receivers == []  # nothing of ours listens by default


def test_commit_sends_deferred_then_published(memory_broker: None) -> None:
    func = registry.get(USER_EVENT).func  # type: ignore[union-attr]
    before = datetime.datetime.now(datetime.timezone.utc)
    with recording() as events, transaction.atomic():
        user_registered.send(sender=None, email="ann@example.com")
        assert names(events) == ["call_deferred"]
    deferred, published = events
    assert names(events) == ["call_deferred", "call_published"]
    assert deferred.sender is func and published.sender is func
    call_id = deferred.kwargs["call_id"]
    assert deferred.kwargs == {
        "handler": USER_EVENT,
        "call_id": call_id,
        "using": "default",
        "delivery": "on_commit",
    }
    assert published.kwargs["handler"] == USER_EVENT
    assert published.kwargs["call_id"] == call_id
    committed_at, published_at = published.kwargs["committed_at"], published.kwargs["published_at"]
    assert before <= committed_at <= published_at
    assert published.kwargs["seconds"] == pytest.approx(
        (published_at - committed_at).total_seconds(), abs=0.01
    )


def test_rollback_sends_deferred_only(memory_broker: None) -> None:
    with recording() as events, transaction.atomic():
        user_registered.send(sender=None, email="ann@example.com")
        transaction.set_rollback(True)
    assert names(events) == ["call_deferred"]


def test_a_sender_receiver_hears_only_its_handler(memory_broker: None) -> None:
    with recording(sender=handlers.counted) as events, transaction.atomic():
        user_registered.send(sender=None, email="ann@example.com")
        counted_signal.send(sender=None, key="k")
    assert names(events) == ["call_deferred", "call_published"]
    assert {event.kwargs["handler"] for event in events} == {"tests.testapp.handlers.counted"}


def test_an_outbox_call_says_so(memory_broker: None) -> None:
    with (
        override_settings(DEFERRED_SIGNALS={"EAGER": False, "DELIVERY": "outbox"}),
        recording() as events,
        transaction.atomic(),
    ):
        user_registered.send(sender=None, email="ann@example.com")
    assert events[0].kwargs["delivery"] == "outbox"
    assert names(events) == ["call_deferred", "call_published"]


@pytest.fixture
def broker_down(settings: SettingsWrapper) -> Iterator[None]:
    with use_app(make_app("down", "redis://127.0.0.1:1/0"), settings, "ds-down"):
        yield


def test_a_call_the_broker_refuses_is_spilled(broker_down: None) -> None:
    with recording() as events, transaction.atomic():
        user_registered.send(sender=None, email="ann@example.com")
    assert names(events) == ["call_deferred", "call_spilled"]
    spilled = events[1].kwargs
    assert spilled["handler"] == USER_EVENT
    assert spilled["call_id"] == events[0].kwargs["call_id"]
    assert isinstance(spilled["error"], Exception)
    assert OutboxCall.objects.filter(id=spilled["call_id"]).exists()


def test_a_call_neither_broker_nor_database_takes_is_lost(
    broker_down: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise DatabaseError("the database is down too")

    with recording() as events, transaction.atomic():
        user_registered.send(sender=None, email="ann@example.com")
        monkeypatch.setattr(QuerySet, "bulk_create", refuse)
    assert names(events) == ["call_deferred", "call_lost"]
    assert events[1].kwargs["call_id"] == events[0].kwargs["call_id"]


def test_an_eager_run_sends_started_and_succeeded() -> None:
    with recording() as events, transaction.atomic():
        user_registered.send(sender=None, email="ann@example.com")
    assert names(events) == ["call_deferred", "handler_started", "handler_succeeded"]
    _, started, succeeded = events
    assert started.kwargs["attempt"] == 1 and succeeded.kwargs["attempt"] == 1
    assert started.kwargs["latency"] >= 0
    assert isinstance(started.kwargs["committed_at"], datetime.datetime)
    assert succeeded.kwargs["duration"] >= 0
    assert len({event.kwargs["call_id"] for event in events}) == 1


def test_an_eager_failure_is_final(settings: SettingsWrapper) -> None:
    with recording() as events, transaction.atomic():
        handlers.signals.flaky_signal.send(sender=None, key="k", fail_times=1)
    assert names(events) == ["call_deferred", "handler_started", "handler_failed"]
    failed = events[-1].kwargs
    assert failed["final"] is True and isinstance(failed["exception"], FlakyError)
    assert failed["duration"] >= 0


def body(**kwargs: Any) -> dict[str, Any]:
    return {"v": 1, "signal": 0, "sender": None, "kwargs": kwargs, "at": 1e9}


def test_retries_then_a_final_failure_then_a_dead_letter() -> None:
    with recording() as events:
        current_app.tasks[FLAKY].apply(kwargs=body(key="k", fail_times=100), task_id="c-1")
    assert names(events) == [
        *["handler_started", "handler_failed", "handler_retried"] * 3,
        "handler_started",
        "handler_failed",
        "call_dead_lettered",
    ]
    assert {event.kwargs["call_id"] for event in events} == {"c-1"}
    assert all(event.sender is handlers.flaky for event in events)
    started = [e.kwargs for e in events if e.name == "handler_started"]
    assert [s["attempt"] for s in started] == [1, 2, 3, 4]
    assert started[0]["committed_at"] == datetime.datetime.fromtimestamp(
        1e9, tz=datetime.timezone.utc
    )
    failed = [e.kwargs for e in events if e.name == "handler_failed"]
    assert [f["final"] for f in failed] == [False, False, False, True]
    retried = [e.kwargs for e in events if e.name == "handler_retried"]
    assert [(r["attempt"], r["countdown"], r["database"]) for r in retried] == [
        (1, 0, False),
        (2, 0, False),
        (3, 0, False),
    ]
    assert isinstance(retried[0]["exception"], FlakyError)
    letter = events[-1].kwargs
    assert letter["handler"] == FLAKY and letter["attempts"] == 4
    assert isinstance(letter["exception"], FlakyError)


def test_a_database_outage_retry_is_flagged() -> None:
    with recording() as events:
        current_app.tasks[DB_FLAKY].apply(
            kwargs=body(key="k", outages=1, failures=0), task_id="c-2"
        )
    assert names(events) == [
        "handler_started",
        "handler_failed",
        "handler_retried",
        "handler_started",
        "handler_succeeded",
    ]
    retried = events[2].kwargs
    assert retried["database"] is True and 0 < retried["countdown"] <= 1


def test_skips_say_why() -> None:
    counted = registry.get("tests.testapp.handlers.counted")
    assert counted is not None
    with recording() as events:
        for _ in range(2):
            decode_call(counted, body(key="k")).run("c-3")
    assert names(events) == [
        "handler_started",
        "handler_succeeded",
        "handler_started",
        "handler_skipped",
    ]
    assert events[-1].kwargs["reason"] == "duplicate"

    article = Article.objects.create(title="gone")
    with recording() as events, transaction.atomic():
        article.save()
        article.delete()
    saved = [event for event in events if event.sender is handlers.article_saved]
    assert names(saved) == ["call_deferred", "handler_started", "handler_skipped"]
    assert saved[-1].kwargs["reason"] == "missing"


def test_a_refused_message_is_a_dead_letter() -> None:
    with recording() as events:
        current_app.tasks[DB_FLAKY].apply(kwargs={"v": 1}, task_id="forged")
    assert names(events) == ["call_dead_lettered"]
    assert events[0].kwargs["attempts"] == 0 and events[0].sender is handlers.db_flaky


def test_coalesced_calls_are_deferred_under_the_id_they_are_published_with(
    memory_broker: None,
) -> None:
    """A metrics receiver pairing call_deferred with call_published finds no orphans."""
    from tests.testapp.models import Author
    from tests.testapp.signals import row_touched

    author = Author.objects.create(name="a")
    other = Author.objects.create(name="b")
    with recording() as events, transaction.atomic():
        for n in range(3):
            row_touched.send(sender=Author, instance=author, label=str(n), created=False)
        row_touched.send(sender=Author, instance=other, label="other", created=False)
        with pytest.raises(RuntimeError), transaction.atomic():
            row_touched.send(sender=Author, instance=author, label="dropped", created=False)
            raise RuntimeError
    deferred = [event.kwargs["call_id"] for event in events if event.name == "call_deferred"]
    published = [event.kwargs["call_id"] for event in events if event.name == "call_published"]
    assert len(deferred) == 5
    assert len(set(published)) == len(published) == 2  # one per row
    assert deferred[:3] == [published[0]] * 3
    assert deferred[3] == published[1]
    assert deferred[4] == published[0]  # joined the group, then rolled back with its savepoint


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_deferred_comes_before_published(memory_broker: None) -> None:
    """Autocommit publishes at once: ``call_deferred`` still comes first, for every kind of
    call (an in-flight gauge never goes below zero)."""
    from tests.testapp.models import Author
    from tests.testapp.signals import row_touched

    author = Author.objects.create(name="a")
    with recording() as events:
        user_registered.send(sender=None, email="ann@example.com")
        row_touched.send(sender=Author, instance=author, label="x", created=False)
    assert names(events) == ["call_deferred", "call_published"] * 2
    assert events[0].kwargs["call_id"] == events[1].kwargs["call_id"]
    assert events[2].kwargs["call_id"] == events[3].kwargs["call_id"]


def test_an_eager_failure_outside_a_transaction_was_deferred_first(
    settings: SettingsWrapper,
) -> None:
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "EAGER": True,
        "EAGER_PROPAGATES": True,
    }
    with recording() as events, pytest.raises(FlakyError):
        handlers.signals.flaky_signal.send(sender=None, key="eager-first", fail_times=1)
    assert names(events)[0] == "call_deferred"
    assert "handler_failed" in names(events)


class SpilledReceiverError(Exception):
    pass


def _failing_receiver(sender: Any, **kwargs: Any) -> None:
    raise SpilledReceiverError


@pytest.mark.parametrize("coalesced", [False, True])
def test_a_failing_call_spilled_receiver_neither_fails_the_commit_nor_loses_calls(
    settings: SettingsWrapper, coalesced: bool
) -> None:
    """A metrics receiver that raises: the commit goes on, and every call is spilled."""
    from tests.testapp.models import Author
    from tests.testapp.signals import row_touched

    app = make_app("spill-receiver", "amqp://guest:guest@127.0.0.1:1//")  # nothing listens
    signals.call_spilled.connect(_failing_receiver)
    try:
        with use_app(app, settings, "ds-never"):
            author = Author.objects.create(name="a")
            with transaction.atomic():
                if coalesced:
                    row_touched.send(sender=Author, instance=author, label="x", created=False)
                user_registered.send(sender=None, n=1)
                user_registered.send(sender=None, n=2)
    finally:
        signals.call_spilled.disconnect(_failing_receiver)
    assert OutboxCall.objects.count() == (3 if coalesced else 2)


def test_a_failing_receiver_after_a_blamed_call_loses_none_of_the_calls_after_it(
    memory_broker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deferred_signals import publisher, sending

    published: list[str] = []

    def publish(calls: Any, deadline: Any = None) -> tuple[int, BaseException | None]:
        if not published:  # the first call's message fails on our side
            error = ValueError("building this call's message failed")
            setattr(error, sending.FAILED_CALL, calls[0].id)
            published.append("")
            return 0, error
        published.extend(call.id for call in calls)
        return len(calls), None

    monkeypatch.setattr(publisher, "publish", publish)
    signals.call_spilled.connect(_failing_receiver)
    try:
        with transaction.atomic():
            for n in range(3):
                user_registered.send(sender=None, n=n)
    finally:
        signals.call_spilled.disconnect(_failing_receiver)
    assert OutboxCall.objects.count() == 1 and len(published) == 1 + 2


@contextmanager
def broken_receivers() -> Iterator[None]:
    """A receiver that raises connected to each of our signals, before any other (a broken
    metrics exporter)."""
    for name in signals.__all__:
        getattr(signals, name).connect(_failing_receiver)
    try:
        yield
    finally:
        for name in signals.__all__:
            getattr(signals, name).disconnect(_failing_receiver)


def test_a_failing_receiver_changes_nothing_on_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    """A handler_started or handler_succeeded receiver that raised made the handler's run a
    failure: a handler that never ran, or one that did kept as a dead letter (run again on
    replay); a handler_failed or handler_retried one replaced Celery's Retry."""
    from deferred_signals.models import DeadLetter
    from tests.testapp.models import Record

    with broken_receivers(), recording() as events:
        ok = current_app.tasks[FLAKY].apply(kwargs=body(key="k", fail_times=1), task_id="c-1")
        bad = current_app.tasks[FLAKY].apply(kwargs=body(key="x", fail_times=9), task_id="c-2")
    assert ok.state == "SUCCESS"
    assert names([event for event in events if event.kwargs["call_id"] == "c-1"]) == [
        "handler_started",
        "handler_failed",
        "handler_retried",
        "handler_started",
        "handler_succeeded",
    ]
    assert Record.objects.filter(handler="flaky").count() == 1  # call c-1, once
    assert bad.state == "FAILURE" and isinstance(bad.result, FlakyError)
    assert names([event for event in events if event.kwargs["call_id"] == "c-2"]) == [
        *["handler_started", "handler_failed", "handler_retried"] * 3,
        "handler_started",
        "handler_failed",
        "call_dead_lettered",
    ]
    assert list(DeadLetter.objects.values_list("call_id", "exception")) == [
        ("c-2", "tests.testapp.handlers.FlakyError")
    ]
    failures = [r.getMessage() for r in caplog.records if r.name == "deferred_signals"]
    logged = f"{FLAKY} [c-1]: tests.test_signals.SpilledReceiverError"
    assert (
        f"deferred_signals: a handler_succeeded receiver (_failing_receiver) failed for {logged}"
        in failures
    )


def test_a_failing_call_deferred_receiver_neither_fails_the_send_nor_drops_the_call(
    memory_broker: None,
) -> None:
    """Outside a transaction the row is committed when post_save is sent: a call_deferred
    receiver that raised dropped the call, and the save() raised after its commit."""
    with broken_receivers(), recording() as events:
        article = Article.objects.create(title="kept")
    saved = [event for event in events if event.sender is handlers.article_saved]
    assert names(saved) == ["call_deferred", "call_published"]
    assert Article.objects.filter(pk=article.pk).exists()


class _FailingMeter:
    """A receiver that is an object, not a function (a metrics client's bound counter)."""

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        raise SpilledReceiverError


@pytest.mark.parametrize(
    "broken", [functools.partial(_failing_receiver), _FailingMeter()], ids=["partial", "object"]
)
def test_a_failing_receiver_without_a_qualname_changes_nothing_either(
    memory_broker: None, broken: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    """Django's send_robust() logs receiver.__qualname__: for a partial or a callable object
    the AttributeError left send(), skipped the receivers after it, and failed what sent it
    (a retry became a failure; the calls published were never announced)."""
    for name in signals.__all__:
        getattr(signals, name).connect(broken, weak=False)
    try:
        with recording() as events:
            Article.objects.create(title="kept")
            ok = current_app.tasks[FLAKY].apply(kwargs=body(key="k", fail_times=1), task_id="c-1")
    finally:
        for name in signals.__all__:
            getattr(signals, name).disconnect(broken)
    assert ok.state == "SUCCESS"
    assert names(events) == [
        *["call_deferred", "call_published"] * 2,  # article_saved, article_snapshot
        *["handler_started", "handler_failed", "handler_retried"],
        *["handler_started", "handler_succeeded"],
    ]
    failures = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(failures) == len(events) and repr(broken) in failures[0]


def test_a_failing_receiver_mails_no_one(memory_broker: None, settings: SettingsWrapper) -> None:
    """Under Django's default LOGGING (DEBUG off, ADMINS set) an ERROR on a "django" logger
    mails the ADMINS: send_robust()'s line on django.dispatch sent one email a call, from the
    commit, with the exception's text in its subject."""
    from django.core import mail
    from django.utils.log import DEFAULT_LOGGING, configure_logging

    settings.DEBUG = False
    settings.ADMINS = [("ops", "ops@example.com")]
    # The test environment's mail backend is locmem already (EMAIL_BACKEND, or MAILERS from
    # Django 6.1 on, where setting EMAIL_BACKEND is deprecated): mail.outbox sees the mails.
    logging.config.dictConfig(DEFAULT_LOGGING)
    signals.call_published.connect(_failing_receiver)
    try:
        with recording() as events, transaction.atomic():
            for n in range(3):
                user_registered.send(sender=None, n=n)
    finally:
        signals.call_published.disconnect(_failing_receiver)
        configure_logging(settings.LOGGING_CONFIG, settings.LOGGING)
    assert names(events).count("call_published") == 3
    assert mail.outbox == []


def test_a_soft_time_limit_met_in_a_receiver_is_the_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Billiard raises SoftTimeLimitExceeded in whatever code runs: in a receiver it is not
    the receiver's failure, and the handler must not start without its time (on a real
    worker: test_signals_worker.py)."""
    from billiard.exceptions import SoftTimeLimitExceeded

    from deferred_signals.models import DeadLetter
    from tests.testapp.models import Record

    def expire(sender: Any, **kwargs: Any) -> None:
        raise SoftTimeLimitExceeded

    signals.handler_started.connect(expire)
    try:
        with recording() as events:
            run = current_app.tasks[FLAKY].apply(kwargs=body(key="k", fail_times=0), task_id="c-1")
    finally:
        signals.handler_started.disconnect(expire)
    assert run.state == "FAILURE" and isinstance(run.result, SoftTimeLimitExceeded)
    assert not Record.objects.filter(handler="flaky").exists()
    assert names(events) == ["handler_started", "handler_failed", "call_dead_lettered"]
    assert DeadLetter.objects.get().exception == "billiard.exceptions.SoftTimeLimitExceeded"
    assert not [r for r in caplog.records if "receiver" in r.getMessage()]  # no one's failure


def test_a_replayed_call_has_its_handlers_retries_again_no_more(deferred: Any) -> None:
    """A letter holding the outage's retry count ("dbr"), which retries do not take from
    max_retries: none the worker writes (deadletters.record drops the worker's keys), but a
    letter's body is only text in a table. The replay's message starts again from retry 0:
    kept, that count gave the replayed call as many extra retries."""
    from deferred_signals.models import DeadLetter
    from deferred_signals.outbox import body_text
    from deferred_signals.replay import replay

    message = {**body(key="replayed", fail_times=99), "dbf": 1e9, "dbr": 2}
    letter = DeadLetter.objects.create(
        call_id="c-replayed", handler=FLAKY, body=body_text(message), attempts=6
    )
    assert replay([letter])[0] == [letter]
    (call,) = deferred.calls
    with recording() as events:
        current_app.tasks[FLAKY].apply(kwargs=json.loads(call.message), task_id=call.id)
    started = [event.kwargs["attempt"] for event in events if event.name == "handler_started"]
    assert started == [1, 2, 3, 4]  # max_retries=3, as for a call sent afresh
    assert names(events)[-1] == "call_dead_lettered"


def test_current_call_answers_in_every_handler_receiver_on_the_worker() -> None:
    """As documented: handler_failed and handler_retried receivers on the worker (sent once
    the handler has raised, where Celery's retry is decided) saw None."""
    seen: list[tuple[str, Any, Any]] = []

    def receive(sender: Any, signal: Any, **kwargs: Any) -> None:
        call = deferred_signals.current_call()
        answer = None if call is None else (call.id, call.attempt, call.handler)
        name = next(name for name in signals.__all__ if getattr(signals, name) is signal)
        seen.append((name, (kwargs["call_id"], kwargs["attempt"], kwargs["handler"]), answer))

    handler_signals = [getattr(signals, name) for name in signals.__all__ if "handler_" in name]
    for signal in handler_signals:
        signal.connect(receive)
    try:
        current_app.tasks[FLAKY].apply(kwargs=body(key="k", fail_times=1), task_id="c-1")
        current_app.tasks[FLAKY].apply(kwargs=body(key="x", fail_times=9), task_id="c-2")
    finally:
        for signal in handler_signals:
            signal.disconnect(receive)
    assert {name for name, _, _ in seen} == {
        "handler_started",
        "handler_failed",
        "handler_retried",
        "handler_succeeded",
    }
    assert [(name, answer) for name, expected, answer in seen if answer != expected] == []
