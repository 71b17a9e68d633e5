"""Unit layer: the settings merge, validation and the system checks."""

from __future__ import annotations

import smtplib
import warnings
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import Error, Warning
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from deferred_signals import registry
from deferred_signals.checks import check_settings
from deferred_signals.conf import conf
from deferred_signals.exceptions import DeferredSignalConfigError

ARTICLE_SAVED = "tests.testapp.handlers.article_saved"


def ids(value: Any) -> list[str]:
    with override_settings(DEFERRED_SIGNALS=value):
        return [message.id for message in check_settings()]


def handler(name: str = ARTICLE_SAVED) -> registry.Handler:
    found = registry.get(name)
    assert found is not None
    return found


def test_precedence_handlers_over_decorator_over_defaults_over_builtin() -> None:
    article_snapshot = handler("tests.testapp.handlers.article_snapshot")  # instance="snapshot"
    queue_before = article_snapshot.merged.get("queue")
    layers = {
        "DEFAULTS": {"queue": "defaults", "instance": "fresh", "max_retries": 1, "priority": 3},
        "HANDLERS": {article_snapshot.name: {"queue": "handlers"}},
    }
    with override_settings(DEFERRED_SIGNALS=layers):
        merged = article_snapshot.merged
        assert merged.get("queue") == "handlers"  # HANDLERS wins
        assert merged.get("instance") == "snapshot"  # decorator beats DEFAULTS
        assert merged.get("max_retries") == 1  # DEFAULTS fill the rest
        assert merged.get("on_missing") == "skip"  # built-in default
        assert merged.publish == {"queue": "handlers", "priority": 3}
    assert article_snapshot.merged.get("queue") == queue_before != "handlers"  # undone


def test_exception_paths_are_resolved() -> None:
    value = {
        "DEFAULTS": {
            "autoretry_for": ["smtplib.SMTPException", "ConnectionError"],
            "dont_autoretry_for": [KeyError],
        }
    }
    with override_settings(DEFERRED_SIGNALS=value):
        merged = handler().merged
        assert merged.autoretry_for == (smtplib.SMTPException, ConnectionError)
        assert merged.dont_autoretry_for == (KeyError,)


def test_valid_settings_pass_the_checks() -> None:
    value = {
        "DEFAULTS": {
            "queue": "signals",
            "max_retries": 3,
            "autoretry_for": ["smtplib.SMTPException"],
            "retry_backoff": True,
            "retry_backoff_max": 600,
            "retry_jitter": True,
            "acks_late": True,
            "reject_on_worker_lost": True,
            "time_limit": 30,
            # Below every registered handler's own time_limit (2 s at least): above one, its
            # messages would be refused (E011).
            "soft_time_limit": 1.5,
            "rate_limit": "10/s",
            "priority": 5,
            "countdown": 0,
            "expires": 3600,
            "default_retry_delay": 10,
            "dont_autoretry_for": [],
            "instance": "snapshot",
            "on_missing": "raise",
        },
        "HANDLERS": {ARTICLE_SAVED: {"max_retries": None}},
        "EAGER": False,
        "DELIVERY": "on_commit",
    }
    assert ids(value) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["not", "a dict"], ["deferred_signals.E001"]),
        ({"DEFAULT": {}}, ["deferred_signals.E002"]),
        ({"DEFAULTS": []}, ["deferred_signals.E003"]),
        ({"HANDLERS": {ARTICLE_SAVED: 5}}, ["deferred_signals.E003"]),
        ({"HANDLERS": []}, ["deferred_signals.E003"]),
        ({"DEFAULTS": {"retries": 3}}, ["deferred_signals.E004"]),
        ({"DEFAULTS": {"max_retries": "3"}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"max_retries": True}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"priority": 300}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"acks_late": "yes"}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"coalesce": "yes"}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"rate_limit": "10/sec"}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"rate_limit": "fast"}}, ["deferred_signals.E005"]),
        ({"EAGER_PROPAGATES": 1}, ["deferred_signals.E007"]),
        ({"DEFAULTS": {"on_missing": "ignore"}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"autoretry_for": "smtplib.SMTPException"}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"autoretry_for": ["smtplib.NoSuchError"]}}, ["deferred_signals.E006"]),
        ({"DEFAULTS": {"autoretry_for": ["no_such_module.Error"]}}, ["deferred_signals.E006"]),
        ({"DEFAULTS": {"dont_autoretry_for": ["smtplib.SMTP_PORT"]}}, ["deferred_signals.E006"]),
        ({"DEFAULTS": {"autoretry_for": ["NoSuchBuiltinError"]}}, ["deferred_signals.E006"]),
        ({"DEFAULTS": {"autoretry_for": ["ConnectionError", "len"]}}, ["deferred_signals.E006"]),
        ({"EAGER": "true"}, ["deferred_signals.E007"]),
        ({"PUBLISH_TIMEOUT": float("inf")}, ["deferred_signals.E007"]),
        ({"PUBLISH_TIMEOUT": float("nan")}, ["deferred_signals.E007"]),
        ({"PUBLISH_COOLDOWN": float("inf")}, ["deferred_signals.E007"]),
        ({"OUTBOX_GRACE": float("inf")}, ["deferred_signals.E007"]),
        ({"DEFAULTS": {"countdown": float("inf")}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"retry_backoff_max": float("inf")}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"rate_limit": float("inf")}}, ["deferred_signals.E005"]),
        (
            {"HANDLERS": {ARTICLE_SAVED: {"db_retry_window": float("inf")}}},
            ["deferred_signals.E005"],
        ),
        ({"DELIVERY": "carrier pigeon"}, ["deferred_signals.E008"]),
        ({"DEFAULTS": {"time_limit": 5, "soft_time_limit": 10}}, ["deferred_signals.E005"]),
        ({"DEFAULTS": {"time_limit": 10, "soft_time_limit": 1}}, []),
        (
            {"DEFAULTS": {"time_limit": 5}, "HANDLERS": {ARTICLE_SAVED: {"soft_time_limit": 9}}},
            ["deferred_signals.E011"],
        ),
        ({"HANDLERS": {"app.signals.typo": {}}}, ["deferred_signals.W001"]),
    ],
)
def test_each_check_id(value: Any, expected: list[str]) -> None:
    assert ids(value) == expected


def test_check_messages_say_what_and_how() -> None:
    with override_settings(DEFERRED_SIGNALS={"HANDLERS": {"app.signals.typo": {"queue": 1}}}):
        messages = check_settings()
    error, warning = sorted(messages, key=lambda m: m.id)
    assert isinstance(error, Error) and isinstance(warning, Warning)
    assert "'queue'" in error.msg and "must be a queue name" in error.hint
    assert error.msg.startswith("settings.DEFERRED_SIGNALS['HANDLERS']['app.signals.typo']")
    assert "app.signals.typo" in warning.msg and ARTICLE_SAVED in warning.hint


# Django 6.1's model checks may query every database.
@pytest.mark.django_db(databases=["default", "other"])
def test_manage_py_check_reports_errors() -> None:
    with (
        override_settings(DEFERRED_SIGNALS={"DEFAULTS": {"max_retries": -1}}),
        pytest.raises(SystemCheckError, match=r"deferred_signals\.E005"),
    ):
        call_command("check")
    call_command("check")  # the test settings themselves are clean


@pytest.mark.parametrize(
    "name",
    ["DEFERRED_SIGNAL", "DEFERED_SIGNALS", "DEFERRED_SIGNALS_DEFAULTS", "DEFERRED_SIGNALS_EAGER"],
)
def test_a_misnamed_setting_is_a_warning_not_silently_ignored(name: str) -> None:
    # Its options would do nothing, and nothing else would say so.
    with override_settings(**{name: {"PUBLISH_TIMEOUT": 9}}):
        (warning,) = check_settings()
        assert conf.publish_timeout != 9
    assert isinstance(warning, Warning) and warning.id == "deferred_signals.W006"
    assert f"settings.{name} is not read" in warning.msg


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("DEFERRED_SIGNALS_EAGER", "Make it the 'EAGER' key of DEFERRED_SIGNALS"),
        ("DEFERRED_SIGNALS_DEFAULTS", "Make it the 'DEFAULTS' key of DEFERRED_SIGNALS"),
        ("DEFERRED_SIGNAL", "Move its keys into DEFERRED_SIGNALS"),
    ],
)
def test_a_misnamed_settings_hint_does_not_say_to_rename_it_over_the_real_one(
    name: str, hint: str
) -> None:
    """It said "Rename it to DEFERRED_SIGNALS" to all: DEFERRED_SIGNALS_EAGER = False renamed
    is DEFERRED_SIGNALS = False, and any renamed one replaces the DEFERRED_SIGNALS there."""
    with override_settings(**{name: False}):
        (warning,) = check_settings()
    assert warning.hint.startswith(hint) and "Rename it" not in warning.hint


def test_a_misnamed_setting_alone_is_to_be_renamed() -> None:
    with override_settings(DEFERRED_SIGNAL={"EAGER": True}):
        del settings.DEFERRED_SIGNALS  # undone with the override
        (warning,) = check_settings()
    assert warning.hint.startswith("Rename it to DEFERRED_SIGNALS, one dict with every key")


def test_settings_of_other_names_are_not_taken_for_misnamed_ones() -> None:
    with override_settings(DEFAULT_SIGNALS=1, DEFERRED=1, SIGNALS=1):
        assert check_settings() == []


@pytest.mark.parametrize("key", ["PUBLISH_TIMEOUT", "PUBLISH_COOLDOWN", "OUTBOX_GRACE"])
def test_infinite_seconds_are_refused_at_check_and_at_use(key: str) -> None:
    with override_settings(DEFERRED_SIGNALS={key: float("inf")}):
        (error,) = check_settings()
        assert error.id == "deferred_signals.E007"
        assert error.msg == f"settings.DEFERRED_SIGNALS[{key!r}] is inf."
        assert "(a finite one: not inf or nan)" in error.hint
        with pytest.raises(DeferredSignalConfigError, match=r"E007"):
            conf.publish_timeout  # noqa: B018


def test_invalid_settings_raise_at_use_with_the_check_id() -> None:
    with (
        override_settings(DEFERRED_SIGNALS={"DEFAULTS": {"queue": ""}}),
        pytest.raises(DeferredSignalConfigError, match=r"E005"),
    ):
        conf.eager  # noqa: B018


@pytest.fixture
def redis_app() -> Any:
    from celery import Celery, current_app

    previous = current_app._get_current_object()
    app = Celery("check-tests", broker="redis://127.0.0.1:6379/0", set_as_current=True)
    yield app
    previous.set_current()


@pytest.mark.parametrize(
    ("options", "transport", "expected"),
    [
        ({"countdown": 3600}, {}, ["deferred_signals.W002"]),
        ({"default_retry_delay": 7200}, {}, ["deferred_signals.W002"]),
        ({"retry_backoff": True, "retry_backoff_max": 4000}, {}, ["deferred_signals.W002"]),
        ({"retry_backoff": False, "retry_backoff_max": 4000}, {}, []),
        ({"countdown": 3600}, {"visibility_timeout": 43200}, []),
        ({"countdown": 600, "default_retry_delay": 60}, {}, []),
        ({"time_limit": 3600}, {}, ["deferred_signals.W002"]),
        ({"soft_time_limit": 100}, {"visibility_timeout": 100}, ["deferred_signals.W002"]),
        ({"time_limit": 300, "soft_time_limit": 200}, {}, []),
    ],
)
def test_redis_delays_longer_than_the_visibility_timeout_warn(
    redis_app: Any, options: dict[str, Any], transport: dict[str, Any], expected: list[str]
) -> None:
    redis_app.conf.broker_transport_options = transport
    assert ids({"HANDLERS": {ARTICLE_SAVED: options}}) == expected


def test_other_brokers_have_no_visibility_timeout() -> None:
    assert ids({"HANDLERS": {ARTICLE_SAVED: {"countdown": 99999}}}) == []


def test_not_a_dict_message_names_the_entry_exactly() -> None:
    with override_settings(DEFERRED_SIGNALS={"HANDLERS": {"a.b": 5}}):
        (error, _warning) = check_settings()
    assert error.msg == "settings.DEFERRED_SIGNALS['HANDLERS']['a.b'] is a int, not a dict."


def test_using_must_name_a_database() -> None:
    from deferred_signals import connect
    from tests.testapp.signals import slow_signal

    def handler(**kwargs: Any) -> None:
        pass

    connect(slow_signal, handler, defer=True, name="tests.bad_alias", using="defualt")
    try:
        assert ids({}) == ["deferred_signals.E009"]
    finally:
        slow_signal.disconnect(handler)
        registry.unregister("tests.bad_alias")


def test_an_unconfigured_celery_app_warns() -> None:
    from celery import Celery, current_app

    previous = current_app._get_current_object()
    Celery("unconfigured", set_as_current=True)
    try:
        assert ids({}) == ["deferred_signals.W003"]
        assert ids({"EAGER": True}) == []  # nothing is published in EAGER mode
        current_app.conf.task_always_eager = True  # nor with Celery's: tasks run in place
        assert ids({}) == []
    finally:
        previous.set_current()


def test_deferred_tasks_are_json_whatever_the_projects_serializer() -> None:
    from celery import current_app

    task = current_app.tasks[ARTICLE_SAVED]
    assert task.serializer == "json"


def test_checks_can_be_run_alone_by_tag() -> None:
    with (
        override_settings(DEFERRED_SIGNALS={"DEFAULTS": {"retries": 1}}),
        pytest.raises(SystemCheckError, match=r"deferred_signals\.E004"),
    ):
        call_command("check", "--tag", "deferred_signals")


def test_a_handler_named_as_another_celery_task_is_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Celery keeps one task per name: the check and a starting worker name the clash."""
    from celery import current_app

    from deferred_signals import connect, tasks
    from deferred_signals.checks import _check_worker_tasks
    from tests.testapp.signals import slow_signal

    @current_app.task(name="tests.clash.sync")
    def sync(**kwargs: Any) -> None:
        pass

    def handler(**kwargs: Any) -> None:
        pass

    def celerys(**kwargs: Any) -> None:
        pass

    with warnings.catch_warnings():  # Celery 5.7 warns (DuplicateTaskNameWarning), 5.5 not
        warnings.simplefilter("ignore")
        connect(slow_signal, handler, defer=True, name="tests.clash.sync")
    connect(slow_signal, celerys, defer=True, name="celery.tests_clash")
    try:
        clashes = [m for m in check_settings() if m.id == "deferred_signals.E010"]
        assert [m.msg.split(" is named ")[0] for m in clashes] == [
            "Deferred handler 'celery.tests_clash'",
            "Deferred handler 'tests.clash.sync'",
        ]
        assert "a name Celery reserves" in clashes[0].msg
        assert f"Celery task {type(sync).__module__}." in clashes[1].msg
        assert "another name=" in (clashes[1].hint or "")
        with caplog.at_level("ERROR", "deferred_signals"):
            _check_worker_tasks(sender=None)
        assert caplog.text.count("deferred_signals.E010") == 2
    finally:
        for func in (handler, celerys):
            slow_signal.disconnect(func)
        for name in ("tests.clash.sync", "celery.tests_clash"):
            registry.unregister(name)
            current_app.tasks.pop(name, None)
            tasks._tasks.pop(name, None)
    assert not [m for m in check_settings() if m.id == "deferred_signals.E010"]


def test_a_soft_time_limit_above_celerys_hard_one_is_an_error() -> None:
    """A handler's soft_time_limit against Celery's task_time_limit: the limits the worker
    and every publish would use, so each call would be refused at its commit."""
    from celery import current_app

    conf_ = current_app.conf
    had, previous = "task_time_limit" in conf_.changes, conf_.changes.get("task_time_limit")
    conf_.task_time_limit = 30
    try:
        with override_settings(
            DEFERRED_SIGNALS={"HANDLERS": {ARTICLE_SAVED: {"soft_time_limit": 60}}}
        ):
            (error,) = [m for m in check_settings() if m.id == "deferred_signals.E011"]
        assert error.msg.startswith(
            f"Deferred handler {ARTICLE_SAVED!r} has soft_time_limit=60 above its time_limit=30"
        )
        assert "soft_time_limit lower than time_limit" in (error.hint or "")
        # Not "every call would fail at its commit": the commit spills it (test_operations).
        assert "so no call of the handler would reach a worker" in error.msg
        assert ids({"HANDLERS": {ARTICLE_SAVED: {"soft_time_limit": 20}}}) == []
    finally:
        # Not `= previous`: a value set on app.conf (even None) would hide Django's settings
        # from the tests after this one.
        if had:
            conf_.changes["task_time_limit"] = previous
        else:
            del conf_.changes["task_time_limit"]


def test_a_queue_celery_refuses_to_route_to_is_an_error() -> None:
    """task_queues declared and task_create_missing_queues off, a production hardening:
    a handler queue missing from the list would make every commit of it fail to publish."""
    from celery import Celery, current_app
    from kombu import Queue

    previous = current_app._get_current_object()
    app = Celery("strict-queues", broker="memory://", set_as_current=True)
    app.conf.task_queues = [Queue("celery"), Queue("crm")]
    app.conf.task_create_missing_queues = False
    try:
        with warnings.catch_warnings():  # the new app takes the shared tasks other tests made
            warnings.simplefilter("ignore")
            app.finalize()
        assert ids({"HANDLERS": {ARTICLE_SAVED: {"queue": "crm"}}}) == []
        with override_settings(DEFERRED_SIGNALS={"HANDLERS": {ARTICLE_SAVED: {"queue": "cmr"}}}):
            (error,) = [m for m in check_settings() if m.id == "deferred_signals.E012"]
        assert error.msg.startswith(
            f"Deferred handler {ARTICLE_SAVED!r} is routed to a queue Celery does not know ("
        )
        assert "'cmr'" in error.msg and "task_create_missing_queues is off" in error.msg
        assert "Add the queue to task_queues" in (error.hint or "")
        app.conf.task_create_missing_queues = True
        app.amqp.__dict__.pop("router", None)  # Celery builds its router once
        app.amqp.__dict__.pop("queues", None)
        assert ids({"HANDLERS": {ARTICLE_SAVED: {"queue": "cmr"}}}) == []
    finally:
        previous.set_current()


def test_a_deferred_pre_save_handler_warns_that_autocommit_publishes_before_the_write() -> None:
    from django.db.models.signals import post_save, pre_save

    from deferred_signals import connect

    def before(**kwargs: Any) -> None:
        pass

    connect([pre_save, post_save], before, defer=True, name="tests.before_the_write")
    try:
        with override_settings(DEFERRED_SIGNALS={}):
            (warning,) = [m for m in check_settings() if m.id == "deferred_signals.W004"]
        assert isinstance(warning, Warning)
        assert warning.msg.startswith(
            "Deferred handler 'tests.before_the_write' listens to pre_save: outside "
            "transaction.atomic() Django sends it before the row is written"
        )
        assert "Connect it to post_save" in (warning.hint or "")
    finally:
        for signal in (pre_save, post_save):
            signal.disconnect(before)
        registry.unregister("tests.before_the_write")
    assert "deferred_signals.W004" not in ids({})
