"""The worker side in this process: message checks, type rules, database-outage retries, dead
letters, ``current_call()`` and idempotent handlers (Celery's ``Task.apply``, SQLite).

The real worker tests (test_worker_faults.py) prove the same against a real worker.
"""

from __future__ import annotations

import datetime
import time
import uuid
from typing import Any

import pytest
from celery import current_app
from celery.exceptions import Reject
from django.db import OperationalError
from django.test import override_settings
from kombu.utils import json as kombu_json

from deferred_signals import DeferredSignalError, current_call, deadletters, registry
from deferred_signals.calls import running
from deferred_signals.codec import MAX_DEPTH
from deferred_signals.exceptions import MalformedMessageError
from deferred_signals.execution import decode_call
from deferred_signals.models import DeadLetter, ProcessedCall
from deferred_signals.strategy import message_problem, too_deep
from tests.conftest import records
from tests.testapp.handlers import FlakyError
from tests.testapp.models import Article, Attempt, Record
from tests.testapp.signals import counted_signal, killable_signal, user_registered

DB_FLAKY = "tests.testapp.handlers.db_flaky"
ARTICLE_SAVED = "tests.testapp.handlers.article_saved"


class FakeMessage:
    def __init__(self, payload: Any, headers: Any = None) -> None:
        self._payload = payload
        self.headers = {"id": "m-1", "task": "t"} if headers is None else headers
        self.body = b"raw"

    @property
    def payload(self) -> Any:
        if isinstance(self._payload, Exception):
            raise self._payload
        return self._payload


def body(**kwargs: Any) -> dict[str, Any]:
    return {"v": 1, "signal": 0, "sender": None, "kwargs": kwargs}


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# --- the strategy's check, before the pool ------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "headers", "reason"),
    [
        ("just a string", None, "not Celery's"),
        ([[], {}], None, "not Celery's"),
        ({"args": [], "kwargs": {}}, None, "not Celery's"),
        ([[1], body(), {}], None, "positional"),
        ([(), body(), {}], None, "args must be a list"),
        ([[], body(), 5], None, "embed"),
        ([[], body(), {"errbacks": [{"task": "other.task"}]}], None, "errbacks"),
        ([[], body(), {"callbacks": None, "chain": [{"task": "x"}]}], None, "a chain"),
        ([[], {"v": 1}, {}], None, "unexpected message fields"),
        ([[], {**body(), "code": 1}, {}], None, "unexpected message fields"),
        ([[], body(x=nested(MAX_DEPTH + 1)), None], None, "deeper than"),
        ([[], body(), {}], [], "no task headers"),
        ([[], body(), {}], {"task": "t"}, "no task id"),
        ([[], body(), {}], {"id": "x", "timelimit": "soon"}, "timelimit"),
        ([[], body(), {}], {"id": "x", "timelimit": [1, 2, 3]}, "timelimit"),
        ([[], body(), {}], {"id": "x", "retries": "1"}, "retries"),
        ([[], body(), {}], {"id": "x", "stamps": {"a": nested(MAX_DEPTH + 1)}}, "headers nest"),
        ([[], body(), {}], {"id": "x", "stamped_headers": 5}, "stamped_headers"),
        ([[], body(), {}], {"id": "x", "stamped_headers": [[1]]}, "stamped_headers"),
        ([[], body(), {}], {"id": "x", "stamps": [1]}, "stamps"),
        (ValueError("bad json"), None, "does not decode"),
    ],
)
def test_the_strategy_refuses_what_celery_would_choke_on(
    payload: Any, headers: Any, reason: str
) -> None:
    problem = message_problem(FakeMessage(payload, headers))
    assert problem is not None and reason in problem


def test_the_strategy_lets_good_messages_through() -> None:
    good = [[], {**body(x=nested(MAX_DEPTH)), "at": 1.0, "dbf": 2.0, "dbr": 1}, None]
    assert message_problem(FakeMessage(good, {"id": "x", "timelimit": [None, 5]})) is None
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}  # as we send it
    assert message_problem(FakeMessage([[], body(), embed], {"id": "x"})) is None
    stamped = {"id": "x", "stamped_headers": ["a"], "stamps": {"a": "b"}}
    assert message_problem(FakeMessage(good, stamped)) is None


def test_the_strategy_refuses_deep_message_properties() -> None:
    # Redis carries properties as JSON; Celery pickles them with the request for the pool.
    message = FakeMessage([[], body(), None], {"id": "x"})
    message.properties = {"delivery_info": {"exchange": nested(MAX_DEPTH + 1)}}
    problem = message_problem(message)
    assert problem is not None and "properties nest" in problem


def test_depth_is_measured_without_recursion() -> None:
    assert too_deep(nested(100_000), 10)
    assert not too_deep(nested(10), 10)
    assert too_deep({"a": [{"b": nested(8)}]}, 10)


@pytest.mark.django_db
def test_send_time_refusal_names_handler_argument_and_depth() -> None:
    user_registered.send(sender=None, deep=nested(MAX_DEPTH))  # EAGER: runs inline
    with pytest.raises(DeferredSignalError) as info:
        user_registered.send(sender=None, label="x", deep=nested(MAX_DEPTH + 1))
    message = str(info.value)
    assert "'tests.user_event'" in message and "'deep'" in message and str(MAX_DEPTH) in message
    with pytest.raises(DeferredSignalError, match="'deep'"):
        user_registered.send(sender=None, deep={"k": (nested(MAX_DEPTH),)})
    with pytest.raises(DeferredSignalError, match="'deep'"):
        user_registered.send(sender=None, deep=nested(5000))  # no RecursionError either


# --- forged references and type confusion -------------------------------------------------


def article_call(sender: Any, instance: Any) -> dict[str, Any]:
    return {
        "v": 1, "signal": 0, "sender": sender,
        "kwargs": {"instance": instance, "created": True, "raw": False, "using": "default",
                   "update_fields": None},
    }  # fmt: skip


ARTICLE = {"$t": "modelclass", "v": "testapp.Article"}


def ref(pk: Any, model: str = "testapp.article", **extra: Any) -> dict[str, Any]:
    return {"$t": "model", "m": model, "pk": pk, "db": "default", "fresh": True, **extra}


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (article_call(ARTICLE, ref(None)), "no pk"),
        (article_call(ARTICLE, ref("abc")), "not a primary key"),
        (article_call({"$t": "modelclass", "v": "auth.User"}, ref(1)), "not one"),
        (article_call(ARTICLE, ref(1, "testapp.author")), "not an instance of"),
        (article_call(ARTICLE, "not an instance"), "not an instance of"),
        (article_call(None, ref(1)), "not one"),
        (article_call(ARTICLE, {"$t": "class", "v": "subprocess:Popen"}), "no registered codec"),
        (article_call(ARTICLE, ref(1, fresh=False, f={"title": "x"})), "without its primary key"),
        (article_call(ARTICLE, ref(1, fresh=False, f={"id": 2})), "pk 1 whose fields hold pk 2"),
        (article_call(ARTICLE, ref(1, f={"id": "1x"})), "not a primary key"),
        (article_call(ARTICLE, ref(None, fresh=False, f={"id": 3})), "pk None whose fields"),
        ({**article_call(ARTICLE, ref(1)), "at": "yesterday"}, "not a time"),
        ({**article_call(ARTICLE, ref(1)), "dbf": float("nan")}, "not a time"),
        ({**article_call(ARTICLE, ref(1)), "dbr": -1}, "not a count"),
    ],
)
def test_forged_calls_are_malformed(message: dict[str, Any], reason: str) -> None:
    handler = registry.get(ARTICLE_SAVED)
    assert handler is not None
    with pytest.raises(MalformedMessageError, match=reason):
        decode_call(handler, message)


def test_a_handler_without_sender_takes_model_classes_and_classes_with_a_codec() -> None:
    handler = registry.get("tests.user_event")
    assert handler is not None
    for sender in (None, "a string", ARTICLE, {"$t": "class", "v": "tests.testapp.handlers:Plain"}):
        decode_call(handler, {**body(), "sender": sender})
    with pytest.raises(MalformedMessageError, match="no registered codec"):
        decode_call(handler, {**body(), "sender": {"$t": "class", "v": "builtins:type"}})


def test_a_model_signal_instance_must_be_of_the_sender_model() -> None:
    handler = registry.get(ARTICLE_SAVED)
    assert handler is not None
    call = decode_call(handler, article_call(ARTICLE, ref(1)))
    assert call.sender is Article


# --- current_call() and idempotent handlers, inline (EAGER) ---------------------------------


@pytest.mark.django_db
def test_current_call_is_set_during_a_deferred_run_only(
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        killable_signal.send(sender=None, key="k", seconds=0)
    assert current_call() is None
    start, done = Record.objects.order_by("id")
    assert start.call == done.call
    assert start.call["handler"] == "tests.testapp.handlers.killable"
    assert start.call["attempt"] == 1
    uuid.UUID(start.call["id"])


def test_committed_at_comes_from_the_message() -> None:
    with running("c", "h", 2, {"at": 1_800_000_000.5}):
        call = current_call()
    assert call is not None and call.attempt == 2
    assert call.committed_at == datetime.datetime(
        2027, 1, 15, 8, 0, 0, 500000, tzinfo=datetime.timezone.utc
    )
    with running("c", "h", 1, {}):
        assert current_call().committed_at is None  # type: ignore[union-attr]


@pytest.mark.django_db
def test_an_idempotent_handler_skips_a_second_delivery(
    caplog: pytest.LogCaptureFixture, django_capture_on_commit_callbacks: Any
) -> None:
    handler = registry.get("tests.testapp.handlers.counted")
    assert handler is not None
    message = body(key="k")
    for _ in range(2):
        decode_call(handler, message).run("call-1")
    assert Attempt.objects.get(key="k").count == 1
    assert ProcessedCall.objects.filter(call_id="call-1").exists()
    assert "call call-1 was already processed" in caplog.text
    with django_capture_on_commit_callbacks(execute=True):
        counted_signal.send(sender=None, key="k")  # another call id
    assert Attempt.objects.get(key="k").count == 2


# --- database outages and dead letters (Celery's Task.apply) --------------------------------


def run(message: dict[str, Any], task_id: str = "call-1", **options: Any) -> Any:
    with override_settings(DEFERRED_SIGNALS={"HANDLERS": {DB_FLAKY: options}}):
        return current_app.tasks[DB_FLAKY].apply(kwargs=message, task_id=task_id)


@pytest.mark.django_db
def test_database_errors_are_retried_off_the_handlers_own_budget() -> None:
    options = {"autoretry_for": ["tests.testapp.handlers.FlakyError"], "max_retries": 1}
    result = run(body(key="k", outages=3, failures=1), **options, default_retry_delay=0)
    assert result.successful()
    (record,) = Record.objects.filter(handler="db_flaky")
    # 3 outage retries + 1 of its own: attempt 5; max_retries=1 was not eaten by the outage.
    call = {k["repr"]: v["repr"] for k, v in record.call["kwargs"]["call"]["items"]}
    assert call["'attempt'"] == "5"
    assert Attempt.objects.get(key="k").count == 5
    assert not DeadLetter.objects.exists()


@pytest.mark.django_db
def test_past_the_window_a_database_error_makes_a_dead_letter() -> None:
    message = {**body(key="k", outages=5, failures=0), "dbf": time.time() - 1000, "dbr": 7}
    result = run(message, db_retry_window=900)
    assert isinstance(result.result, OperationalError)
    letter = DeadLetter.objects.get(call_id="call-1")
    assert letter.exception == "django.db.utils.OperationalError"
    assert letter.handler == DB_FLAKY and "outage 1 of k" in letter.traceback
    # The body a replay publishes: the worker's own retry keys stripped.
    assert kombu_json.loads(letter.body) == body(key="k", outages=5, failures=0)


@pytest.mark.django_db
def test_with_the_window_off_a_database_error_is_the_handlers_own() -> None:
    result = run(body(key="k", outages=1, failures=0), db_retry_window=0)
    assert isinstance(result.result, OperationalError)
    assert Attempt.objects.get(key="k").count == 1
    assert DeadLetter.objects.filter(call_id="call-1").exists()


@pytest.mark.django_db
def test_running_out_of_retries_makes_one_dead_letter_per_call() -> None:
    options = {"autoretry_for": [FlakyError], "max_retries": 1, "default_retry_delay": 0}
    for _ in range(2):  # the same call id failing again (a replay) updates its row
        result = run(body(key="k", outages=0, failures=100), **options)
        assert isinstance(result.result, FlakyError)
    letter = DeadLetter.objects.get(call_id="call-1")
    assert letter.attempts == 2 and letter.exception == "tests.testapp.handlers.FlakyError"
    assert letter.last_failed_at >= letter.first_failed_at
    assert letter.message == "attempt 4 of k"


@pytest.mark.django_db
def test_a_malformed_message_is_a_dead_letter() -> None:
    result = run({"v": 1}, task_id="forged")
    assert isinstance(result.result, Reject)
    assert DeadLetter.objects.get(call_id="forged").attempts == 0


@pytest.mark.django_db
def test_a_snapshot_whose_fields_lack_its_pk_is_a_dead_letter_not_a_run() -> None:
    message = article_call(ARTICLE, ref(1, fresh=False, f={"title": "forged"}))
    result = current_app.tasks[ARTICLE_SAVED].apply(kwargs=message, task_id="no-pk")
    assert isinstance(result.result, Reject)
    assert "without its primary key field 'id'" in DeadLetter.objects.get(call_id="no-pk").message
    assert records("article_saved") == []


@pytest.mark.django_db
def test_dead_letters_can_be_turned_off() -> None:
    with override_settings(DEFERRED_SIGNALS={"DEAD_LETTERS": False}):
        assert not deadletters.record(
            call_id="x", handler="h", body=body(), exception=ValueError("v")
        )
    assert not DeadLetter.objects.exists()


def test_a_dead_letter_the_database_refuses_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    # No database access in this test: the write fails as it would with the database down.
    kept = deadletters.record(call_id="lost-1", handler="h", body=body(), exception=KeyError())
    assert kept is False
    assert "Could not record the dead letter of call lost-1" in caplog.text


def test_the_settings_check_the_new_options() -> None:
    from deferred_signals.schema import option_problems, settings_problems

    assert [p.id for p in option_problems({"idempotent": "yes"}, "x")] == ["deferred_signals.E005"]
    assert [p.id for p in option_problems({"db_retry_window": -1}, "x")] == [
        "deferred_signals.E005"
    ]
    assert option_problems({"idempotent": True, "db_retry_window": 0}, "x") == []
    assert [p.id for p in settings_problems({"DEAD_LETTERS": "no"})] == ["deferred_signals.E007"]


@pytest.mark.django_db
def test_a_retry_the_broker_refuses_makes_a_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a worker, Task.retry publishes the retry; when that publish fails Celery raises
    # Reject(requeue=False) and the message is dropped: the call must survive as a dead letter.
    from celery.canvas import Signature

    def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError("broker refuses writes")

    task = current_app.tasks[DB_FLAKY]
    real_retry = type(task).retry

    def retry_as_a_worker(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.request.is_eager = False  # apply() is eager: publish as a worker would
        return real_retry(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", refused)
    monkeypatch.setattr(type(task), "retry", retry_as_a_worker)
    options = {"autoretry_for": [FlakyError], "max_retries": 3, "default_retry_delay": 0}
    result = run(body(key="k", outages=0, failures=100), **options)
    assert isinstance(result.result, Reject)
    letter = DeadLetter.objects.get(call_id="call-1")
    assert letter.exception == "tests.testapp.handlers.FlakyError"


@pytest.mark.django_db
def test_a_call_under_a_former_name_no_worker_knew_replays_once_an_alias_answers() -> None:
    from deferred_signals.replay import replay
    from deferred_signals.unregistered import on_task_unknown

    old = "tests.testapp.handlers.old_name"  # an alias of handlers.renamed, added too late
    message = FakeMessage([[], body(label="x"), None], {"id": "u-1", "task": old, "retries": 1})
    on_task_unknown(message=message, name=old, id="u-1")
    on_task_unknown(message=FakeMessage([[1], {}, None]), name=old, id="m-1")  # not ours
    letter = DeadLetter.objects.get()
    assert (letter.call_id, letter.handler, letter.attempts) == ("u-1", old, 1)
    assert letter.exception == "celery.exceptions.NotRegistered"
    replayed, skipped = replay([letter], dry_run=True)
    assert replayed == [letter] and skipped == []


@pytest.mark.django_db
def test_a_dead_letter_with_nul_characters_is_kept() -> None:
    # A raw body that did not decode, or an exception's text: PostgreSQL's text refuses NUL.
    kept = deadletters.record(
        call_id="nul", handler="h", body="a\x00b", exception=ValueError("c\x00d")
    )
    letter = DeadLetter.objects.get(call_id="nul")
    assert kept and (letter.body, letter.message) == ("a\ufffdb", "c\ufffdd")


@pytest.mark.django_db
def test_a_dead_letter_whose_call_id_or_name_holds_nul_is_kept() -> None:
    # A forged message's id header or task name (an unknown one) is any JSON string.
    kept = deadletters.record(call_id="i\x00d", handler="h\x00", body="{}", exception=KeyError())
    letter = DeadLetter.objects.get()
    assert kept and (letter.call_id, letter.handler) == ("i\ufffdd", "h\ufffd")


def test_our_retries_wait_at_most_half_of_redis_visibility_timeout() -> None:
    from deferred_signals.retries import DB_RETRY_BACKOFF_MAX, longest_wait

    task = current_app.tasks[DB_FLAKY]
    assert longest_wait(task) == DB_RETRY_BACKOFF_MAX  # the tests' memory:// broker
    # Read live, at each retry. Through the Django settings the app reads (CELERY_*): Celery
    # 5.5 answers a namespaced key before a change made with app.conf.broker_url = ...
    redis = {"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}
    with override_settings(**redis, CELERY_BROKER_TRANSPORT_OPTIONS={"visibility_timeout": 10}):
        assert longest_wait(task) == 5
    with override_settings(**redis, CELERY_BROKER_TRANSPORT_OPTIONS={}):
        assert longest_wait(task) == DB_RETRY_BACKOFF_MAX


def test_our_retries_wait_at_most_half_of_redis_visibility_timeout_with_failover_urls() -> None:
    # broker_url may be a list of failover URLs (kombu takes those too): still Redis.
    from deferred_signals.retries import longest_wait

    task = current_app.tasks[DB_FLAKY]
    with override_settings(
        CELERY_BROKER_URL=["redis://127.0.0.1:6379/0", "redis://127.0.0.2:6379/0"],
        CELERY_BROKER_TRANSPORT_OPTIONS={"visibility_timeout": 10},
    ):
        assert longest_wait(task) == 5


@pytest.fixture
def as_a_worker(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The db_flaky task serving a message, as on a worker (not apply()'s eager request);
    its retries are not published."""
    from celery.canvas import Signature

    monkeypatch.setattr(Signature, "apply_async", lambda *args, **kwargs: None)
    task = current_app.tasks[DB_FLAKY]
    task.push_request(id="call-1", retries=0, is_eager=False, called_directly=False)
    yield task
    task.pop_request()


@pytest.mark.django_db
def test_a_dead_letter_a_database_that_answers_refuses_is_not_retried(as_a_worker: Any) -> None:
    # SQLite raises OperationalError for a missing table (MySQL for an unknown column): the
    # database answers, every retry would fail the same way, re-running the handler for ever.
    from django.db import connection

    from deferred_signals.tasks import keep

    with connection.cursor() as cursor:  # undone by the test's transaction
        cursor.execute(f"DROP TABLE {DeadLetter._meta.db_table}")
    handler = registry.get(DB_FLAKY)
    assert keep(as_a_worker, handler, body(key="k"), FlakyError("x")) is False


def test_a_call_retried_for_want_of_its_dead_letter_retries_past_1024_times(
    as_a_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each retry of a call whose dead letter cannot be written counts one more in "dbr": a
    # database down for hours took the backoff's 2.0 ** dbr past a float (OverflowError).
    from celery.exceptions import Retry

    from deferred_signals.retries import DB_RETRY_BACKOFF_MAX
    from deferred_signals.tasks import keep

    def down(**_: Any) -> bool:
        raise OperationalError("connection refused")

    monkeypatch.setattr(deadletters, "write", down)
    # The database is down: no connection answers.
    monkeypatch.setattr(deadletters, "_reachable", lambda using: False, raising=False)
    handler = registry.get(DB_FLAKY)
    with pytest.raises(Retry) as retry:
        keep(as_a_worker, handler, {**body(key="k"), "dbr": 1100}, FlakyError("x"))
    assert 0 < float(retry.value.when) <= DB_RETRY_BACKOFF_MAX


def test_an_unregistered_message_of_a_content_type_not_accepted_is_left_to_celery() -> None:
    # Another producer's pickled task on the queue: Celery refuses it; the receiver raising
    # here made Celery log "Signal handler ... raised" with a traceback for each such message.
    from kombu.exceptions import ContentDisallowed

    from deferred_signals.unregistered import on_task_unknown

    refused = ContentDisallowed("Refusing to deserialize untrusted content of type pickle")
    message = FakeMessage(refused, {"id": "p-1", "task": "other.task"})
    on_task_unknown(message=message, name="other.task", id="p-1")  # does not raise


@pytest.mark.django_db
def test_with_dead_letters_off_an_unregistered_call_is_not_said_to_be_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from deferred_signals.unregistered import on_task_unknown

    old = "tests.testapp.handlers.old_name"
    message = FakeMessage([[], body(label="x"), None], {"id": "u-2", "task": old})
    with override_settings(DEFERRED_SIGNALS={"DEAD_LETTERS": False}):
        on_task_unknown(message=message, name=old, id="u-2")
    assert not DeadLetter.objects.exists()
    assert "as a dead letter" not in caplog.text  # Celery's own error is the whole story
