"""The publish step against a real Redis, with nobody consuming: what reaches the broker."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.exceptions import QueueNotFound
from celery.signals import after_task_publish, before_task_publish
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as KombuOperationalError
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import broker, publisher, sending
from deferred_signals.exceptions import PublishTimeout
from deferred_signals.models import OutboxCall
from tests.conftest import Queue, use_app
from tests.testapp.models import Article
from tests.testapp.signals import user_registered
from tests.workers import make_app

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_transaction_publishes_all_its_calls_at_commit(redis_queue: Queue) -> None:
    label = uuid.uuid4().hex
    with transaction.atomic():
        for i in range(1000):
            user_registered.send(sender=None, label=label, i=i)
        assert len(redis_queue) == 0
    messages = redis_queue.messages()
    assert len(messages) == 1000
    assert {m["headers"]["task"] for m in messages} == {"tests.user_event"}
    assert len({m["headers"]["id"] for m in messages}) == 1000
    bodies = [json.loads(base64.b64decode(m["body"])) for m in messages]
    assert [body[1]["kwargs"]["i"] for body in bodies] == list(range(1000))  # send order
    # What Flower and the worker log show: a short summary without argument values (they may
    # be personal data), not the tagged body.
    assert messages[7]["headers"]["kwargsrepr"] == "sender=None, label=<str>, i=<int>"


def test_many_signals_cost_a_few_broker_round_trips_not_one_each(
    redis_queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu import Producer
    from redis.connection import AbstractConnection

    if not hasattr(Producer, "batch"):
        pytest.skip("kombu < 5.7 has no Producer.batch(): one publish per call")
    writes: list[list[int]] = []  # per round trip: the messages of each LPUSH
    original = AbstractConnection.send_packed_command

    def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        packed = b"".join(command) if isinstance(command, list) else bytes(command)
        if b"LPUSH" in packed:  # connection set-up and the queue's declaration aside
            # "*N\r\n$5\r\nLPUSH": N arguments, the command and the key among them.
            found = re.findall(rb"\*(\d+)\r\n\$5\r\nLPUSH\r\n", packed)
            writes.append([int(count) - 2 for count in found])
        original(self, command, check_health)

    with transaction.atomic():
        for i in range(250):
            user_registered.send(sender=None, i=i)
        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    monkeypatch.undo()
    assert len(redis_queue) == 250
    # Three round trips, not 250; each chunk of calls to the one queue is a single LPUSH.
    assert writes == [[100], [100], [50]]


def test_rollback_publishes_nothing_and_autocommit_publishes_at_once(redis_queue: Queue) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Article.objects.create(title="rolled back")
        raise RuntimeError
    assert len(redis_queue) == 0
    Article.objects.create(title="autocommit")
    assert len(redis_queue) == 2  # article_saved and article_snapshot, at once


def test_messages_are_json_even_when_the_project_pickles(redis_queue: Queue) -> None:
    redis_queue.app.conf.task_serializer = "pickle"
    with transaction.atomic():
        user_registered.send(sender=None, label="json")
    (message,) = redis_queue.messages()
    assert message["content-type"] == "application/json"


def test_celery_publish_signals_fire_so_tracing_headers_survive(redis_queue: Queue) -> None:
    published: list[str] = []

    def inject(headers: dict[str, Any], **kwargs: Any) -> None:
        headers["traceparent"] = f"00-{headers['id'].replace('-', '')}-0000000000000001-01"

    def count(sender: str, **kwargs: Any) -> None:
        published.append(sender)

    before_task_publish.connect(inject, weak=False)
    after_task_publish.connect(count, weak=False)
    try:
        with transaction.atomic():
            for _ in range(3):
                user_registered.send(sender=None)
    finally:
        before_task_publish.disconnect(inject)
        after_task_publish.disconnect(count)
    assert published == ["tests.user_event"] * 3
    assert all(m["headers"]["traceparent"].startswith("00-") for m in redis_queue.messages())


def test_the_handlers_of_one_send_share_its_body_and_each_send_has_its_own(
    redis_queue: Queue,
) -> None:
    """The publisher encodes a send's body once for all its handlers: every message must
    still carry its own send's arguments, and a before_task_publish receiver that changes a
    body changes that message only."""
    from django.dispatch import Signal

    from deferred_signals import connect, registry

    sent = Signal()

    def first(sender: Any, **kwargs: Any) -> None: ...

    def second(sender: Any, **kwargs: Any) -> None: ...

    names = ["tests.shared_body_first", "tests.shared_body_second"]
    for func, name in zip((first, second), names, strict=True):
        connect(sent, func, defer=True, name=name, queue=redis_queue.name)

    def mark(body: Any, headers: dict[str, Any], **kwargs: Any) -> None:
        if headers["task"] == names[1] and body[1]["kwargs"]["n"] == 1:
            body[1]["kwargs"]["marked"] = True

    try:
        with transaction.atomic():
            for n in range(3):
                sent.send(sender=None, n=n, when=timezone.now())
        before_task_publish.connect(mark, weak=False)
        try:
            with transaction.atomic():
                sent.send(sender=None, n=1, note="with a receiver")
        finally:
            before_task_publish.disconnect(mark)
    finally:
        for func, name in zip((first, second), names, strict=True):
            sent.disconnect(func)
            registry.unregister(name)
    messages = redis_queue.messages()
    assert [m["headers"]["task"] for m in messages] == names * 4
    bodies = [json.loads(base64.b64decode(m["body"]))[1] for m in messages]
    assert [body["kwargs"]["n"] for body in bodies] == [0, 0, 1, 1, 2, 2, 1, 1]
    for pair in range(3):
        assert bodies[2 * pair] == bodies[2 * pair + 1]
        assert bodies[2 * pair]["kwargs"]["when"]["$t"] == "dt"
    assert "marked" not in bodies[6]["kwargs"]
    assert bodies[7]["kwargs"]["marked"] is True
    assert [m["headers"]["kwargsrepr"] for m in messages[:2]] == [
        "sender=None, n=<int>, when=<dt>"
    ] * 2
    assert messages[6]["headers"]["kwargsrepr"] == "sender=None, n=<int>, note=<str>"


@pytest.fixture
def broker_down(settings: SettingsWrapper) -> Iterator[None]:
    app = make_app("broker-down", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    publisher.reset()
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "PUBLISH_TIMEOUT": 2}
    with use_app(app, settings, "nowhere"):
        yield
    publisher.reset()


def outbox_rows() -> dict[str, OutboxCall]:
    return {row.handler: row for row in OutboxCall.objects.all()}


def test_broker_down_at_commit_spills_every_call_to_the_outbox(
    broker_down: None, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="deferred_signals"), transaction.atomic():
        article = Article.objects.create(title="committed anyway")
    elapsed = time.monotonic() - started
    loud = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert Article.objects.filter(pk=article.pk).exists()  # the data is committed
    rows = outbox_rows()
    assert set(rows) == {
        "tests.testapp.handlers.article_saved",
        "tests.testapp.handlers.article_snapshot",
    }
    saved = rows["tests.testapp.handlers.article_saved"]
    body = json.loads(saved.body)
    assert body["kwargs"]["instance"]["pk"] == article.pk and "at" in body
    assert saved.next_attempt_at <= timezone.now()  # due for the relay at once
    assert "ConnectionError" in saved.last_error or "OperationalError" in saved.last_error
    # One line per call, naming the handler, the call and the error, with no argument values
    # (they may be personal data)...
    lines = [record.getMessage() for record in loud]
    assert len(lines) == 2, lines
    (line,) = [line for line in lines if f"article_saved [{saved.id}]" in line]
    assert line.startswith("deferred_signals spilled: tests.testapp.handlers.article_saved")
    assert f"instance=<testapp.article pk={article.pk}>" in line
    assert "Connection refused" in line and ("Error: " in line), line
    assert "committed anyway" not in caplog.text
    # ...and the traceback once, at DEBUG: a broker down is no bug, and an outage would
    # otherwise log some 20 frames of kombu's for each commit that tries the broker.
    assert not [record for record in loud if record.exc_info]
    assert len([record for record in caplog.records if record.exc_info]) == 1
    assert elapsed < 2 + 0.5  # PUBLISH_TIMEOUT (default 2 s) + slack: never Celery's retries


def test_after_a_failure_the_process_spills_at_once_for_a_cooldown(
    broker_down: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []
    acquire = broker._Pool.acquire

    def counting(self: broker._Pool, deadline: float) -> Any:
        attempts.append(1)
        return acquire(self, deadline)

    monkeypatch.setattr(broker._Pool, "acquire", counting)
    Article.objects.create(title="first")  # tries the broker: fails (and retries once)
    tried = len(attempts)
    assert tried >= 1
    for i in range(5):
        Article.objects.create(title=f"during the cooldown {i}")
    assert len(attempts) == tried  # the broker was not tried again
    assert OutboxCall.objects.count() == 12
    monkeypatch.setattr(publisher.cooldown, "until", 0.0)  # the cooldown ends
    Article.objects.create(title="after")
    assert len(attempts) > tried  # probed again


def test_outbox_mode_writes_the_call_in_the_transaction_and_deletes_it_once_published(
    redis_queue: Queue, settings: SettingsWrapper
) -> None:
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "DELIVERY": "outbox"}
    with transaction.atomic():
        Article.objects.create(title="durable")
        inside = list(OutboxCall.objects.values_list("handler", flat=True))
        assert len(redis_queue) == 0
    assert sorted(inside) == [
        "tests.testapp.handlers.article_saved",
        "tests.testapp.handlers.article_snapshot",
    ]
    assert len(redis_queue) == 2 and OutboxCall.objects.count() == 0
    ids = {m["headers"]["id"] for m in redis_queue.messages()}
    assert len(ids) == 2


def test_outbox_rows_roll_back_with_the_transaction_and_its_savepoints(
    redis_queue: Queue, settings: SettingsWrapper
) -> None:
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "DELIVERY": "outbox"}
    with transaction.atomic():
        Article.objects.create(title="kept")
        with pytest.raises(RuntimeError), transaction.atomic():
            Article.objects.create(title="savepoint rolled back")
            assert OutboxCall.objects.count() == 4
            raise RuntimeError
        assert OutboxCall.objects.count() == 2
    with pytest.raises(RuntimeError), transaction.atomic():
        Article.objects.create(title="all rolled back")
        raise RuntimeError
    assert OutboxCall.objects.count() == 0 and len(redis_queue) == 2


def test_outbox_mode_per_handler_with_the_broker_down_leaves_rows_due(
    broker_down: None, settings: SettingsWrapper
) -> None:
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "HANDLERS": {"tests.testapp.handlers.article_saved": {"delivery": "outbox"}},
    }
    with transaction.atomic():
        Article.objects.create(title="payment")
    rows = outbox_rows()
    assert set(rows) == {
        "tests.testapp.handlers.article_saved",  # written in the transaction
        "tests.testapp.handlers.article_snapshot",  # spilled after it
    }
    assert all(row.next_attempt_at <= timezone.now() for row in rows.values())


def test_dropping_a_broken_connection_leaves_other_threads_sockets_blocking(
    redis_queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kombu's Redis transport has no _collect(): collect(socket_timeout=t) sets the process-wide
    # socket.setdefaulttimeout(t) while it closes. With 0, every socket another thread opens
    # meanwhile (an HTTP client, a new broker connection) is non-blocking and fails at once.
    import socket

    defaults: list[Any] = []
    real = socket.setdefaulttimeout

    def recording(timeout: Any) -> None:
        defaults.append(timeout)
        real(timeout)

    pool = broker._pool()
    producer = pool.acquire(time.monotonic() + 5)
    assert producer.channel is not None  # connected
    monkeypatch.setattr(socket, "setdefaulttimeout", recording)
    pool.release(producer, healthy=False)
    assert 0 not in defaults


def test_a_failing_call_published_receiver_is_not_a_broker_failure(redis_queue: Queue) -> None:
    from deferred_signals import signals

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("metrics backend down")

    signals.call_published.connect(broken, weak=False)
    try:
        with transaction.atomic():
            Article.objects.create(title="published")
    finally:
        signals.call_published.disconnect(broken)
    assert len(redis_queue) == 2  # published once,
    assert not OutboxCall.objects.exists()  # not spilled as if the broker had failed,
    assert not publisher.cooldown.active()  # and no cooldown for the next request


def test_a_bug_on_the_publishing_side_spills_without_a_retry_or_a_cooldown(
    redis_queue: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a broker outage (here: kombu internals the Redis path relies on, changed): the
    calls are kept (spilled), neither tried again on a new connection nor followed by a
    cooldown that would spill every request of the process for PUBLISH_COOLDOWN seconds."""
    from deferred_signals.redispush import RedisPush

    tries: list[str] = []

    def changed_kombu(self: RedisPush, message: Any) -> bool:
        tries.append(message.headers["id"])
        raise AttributeError("'Channel' object has no attribute '_q_for_pri'")

    monkeypatch.setattr(RedisPush, "add", changed_kombu)
    with caplog.at_level(logging.WARNING, logger="deferred_signals"), transaction.atomic():
        user_registered.send(sender=None, label="kept")
    # A bug to find: its traceback at WARNING, with the call's line.
    (record,) = [record for record in caplog.records if record.exc_info]
    assert record.levelno == logging.WARNING and record.exc_info
    assert record.exc_info[0] is AttributeError
    assert f"spilled: tests.user_event [{tries[0]}]" in caplog.text
    assert len(tries) == 1  # one try: a fresh connection would not change the code
    assert len(redis_queue) == 0
    assert OutboxCall.objects.count() == 1  # committed, so kept for the relay
    assert not publisher.cooldown.active()
    monkeypatch.undo()
    with transaction.atomic():
        user_registered.send(sender=None, label="next request")
    assert len(redis_queue) == 1  # published at once, not spilled for a cooldown


def test_a_refusal_that_used_up_publish_timeout_leaves_no_second_attempt(
    redis_queue: Queue, settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempts of one commit share one deadline: once a refusal used it up, the calls
    after the refused one are spilled at once, not tried again for a PUBLISH_TIMEOUT more."""
    from deferred_signals.exceptions import PublishRefused

    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "PUBLISH_TIMEOUT": 0.05}
    deadlines: list[float | None] = []

    def refused_late(calls: Any, deadline: float | None = None) -> tuple[int, BaseException]:
        deadlines.append(deadline)
        time.sleep(0.06)  # the broker's answer came at the end of PUBLISH_TIMEOUT
        error = PublishRefused("the broker refused message 1 of the batch")
        setattr(error, sending.FAILED_CALL, calls[0].id)
        return 0, error

    monkeypatch.setattr(publisher, "publish", refused_late)
    with transaction.atomic():
        for i in range(3):
            user_registered.send(sender=None, label="late", i=i)
    assert len(deadlines) == 1, "no second attempt"
    assert deadlines[0] is not None and deadlines[0] < time.monotonic()  # the commit's own
    assert OutboxCall.objects.count() == 3  # the refused call and the two after it
    assert len(redis_queue) == 0


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError("timed out"), True),
        (KombuOperationalError("gone"), True),
        (PublishTimeout("PUBLISH_TIMEOUT ran out"), True),
        (ValueError("a bug"), False),
        (TypeError("a bug"), False),
        (KeyError("a bug"), False),
    ],
)
def test_what_counts_as_a_broker_failure(error: BaseException, expected: bool) -> None:
    assert broker.is_broker_failure(error) is expected


def test_the_transports_own_errors_count_as_broker_failures(redis_queue: Queue) -> None:
    import redis

    assert broker.is_broker_failure(redis.exceptions.ConnectionError("reset"))
    assert broker.is_broker_failure(redis.exceptions.TimeoutError("slow"))
    assert not broker.is_broker_failure(AttributeError("a bug"))
    # kombu's Redis transport lists KeyError among its connection errors: a missing queue
    # (Celery's QueueNotFound is a KeyError) is a project's mistake, not an outage.
    assert not broker.is_broker_failure(QueueNotFound("nowhere"))
    assert not broker.is_broker_failure(KeyError("a bug"))
    assert broker.is_broker_failure(ChannelError("Cannot add file to directory"))


def test_a_failing_call_spilled_receiver_does_not_fail_the_request(broker_down: None) -> None:
    from deferred_signals import signals

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("metrics backend down")

    signals.call_spilled.connect(broken, weak=False)
    try:
        with transaction.atomic():
            Article.objects.create(title="spilled anyway")
    finally:
        signals.call_spilled.disconnect(broken)
    assert OutboxCall.objects.count() == 2  # committed and spilled; the request went on


def test_with_celerys_task_always_eager_handlers_run_here_without_a_broker(
    broker_down: None, caplog: pytest.LogCaptureFixture
) -> None:
    """The usual Celery test setting: Celery's own tasks then run in place without a broker,
    and so do deferred handlers, after the commit, rather than going to the outbox."""
    from celery import current_app

    from tests.conftest import records

    current_app.conf.task_always_eager = True
    with caplog.at_level(logging.WARNING, logger="deferred_signals"):
        with transaction.atomic():
            article = Article.objects.create(title="eager")
            assert records("article_saved") == []  # not before commit
        (record,) = records("article_saved")
    assert record.call["kwargs"]["instance"]["pk"]["repr"] == repr(article.pk)
    assert OutboxCall.objects.count() == 0
    assert caplog.text == ""
    # Without a broker_url at all too, as Celery's own tasks do.
    current_app.conf.broker_url = None
    Article.objects.create(title="no broker")
    assert len(records("article_saved")) == 2


def celery_eager(propagates: bool) -> None:
    from celery import current_app

    current_app.conf.task_always_eager = True
    current_app.conf.task_eager_propagates = propagates


@pytest.mark.parametrize("mode", ["on_commit", "outbox"])
def test_with_task_eager_propagates_a_failing_handler_raises_into_the_test_once_its_batch_ran(
    broker_down: None, caplog: pytest.LogCaptureFixture, settings: SettingsWrapper, mode: str
) -> None:
    """What a Django developer who sets ``CELERY_TASK_EAGER_PROPAGATES`` expects: the
    handler's exception fails the test, as a Celery task's does. It used to be swallowed.
    The call ran once, here, and failed for good: a dead letter, as on a worker, neither
    spilled nor left in the outbox (the relay would run it again); the calls after it in the
    batch ran too, and the first failure is raised once they have."""
    from deferred_signals.models import DeadLetter
    from tests.conftest import records
    from tests.testapp.handlers import FlakyError
    from tests.testapp.models import Attempt
    from tests.testapp.signals import flaky_signal

    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "DELIVERY": mode,
        "HANDLERS": {"tests.testapp.handlers.flaky": {"max_retries": 0}},
    }
    celery_eager(propagates=True)
    with caplog.at_level(logging.WARNING, logger="deferred_signals"):
        with pytest.raises(FlakyError, match="attempt 1 of always-fails"), transaction.atomic():
            flaky_signal.send(sender=None, key="always-fails", fail_times=100)
            user_registered.send(sender=None, label="after it")
            flaky_signal.send(sender=None, key="fails-too", fail_times=100)
        # Outside a transaction the exception leaves the signal's send.
        with pytest.raises(FlakyError, match="attempt 1 of autocommit"):
            flaky_signal.send(sender=None, key="autocommit", fail_times=100)
    assert OutboxCall.objects.count() == 0
    letters = DeadLetter.objects.order_by("id")
    assert [letter.handler for letter in letters] == ["tests.testapp.handlers.flaky"] * 3
    assert {letter.attempts for letter in letters} == {1}
    assert dict(Attempt.objects.values_list("key", "count")) == {
        "always-fails": 1,
        "fails-too": 1,
        "autocommit": 1,
    }, "each ran once"
    assert [record.handler for record in records()] == ["user_event"]  # the next one ran
    assert "could not publish" not in caplog.text
    assert "spilled" not in caplog.text


def test_without_task_eager_propagates_a_failing_handler_is_a_dead_letter_only(
    broker_down: None, settings: SettingsWrapper
) -> None:
    from deferred_signals.models import DeadLetter
    from tests.testapp.signals import flaky_signal

    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "HANDLERS": {"tests.testapp.handlers.flaky": {"max_retries": 0}},
    }
    celery_eager(propagates=False)
    with transaction.atomic():
        flaky_signal.send(sender=None, key="always-fails", fail_times=100)
    assert DeadLetter.objects.count() == 1
    assert OutboxCall.objects.count() == 0
