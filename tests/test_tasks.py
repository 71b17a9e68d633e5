"""The handler tasks inside this process: options Celery reads from them, retry decisions.

The real worker tests (test_worker.py) prove retries across a broker; these run Celery's own
``Task.apply`` (its eager execution, retries included) to cover every retry option.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from celery import current_app
from celery.exceptions import Reject
from django.test import override_settings

from deferred_signals.dispatch import PendingCall
from tests.testapp.handlers import FlakyError
from tests.testapp.models import Attempt
from tests.testapp.signals import flaky_signal

FLAKY = "tests.testapp.handlers.flaky"
ARTICLE_SAVED = "tests.testapp.handlers.article_saved"


def task(name: str) -> Any:
    return current_app.tasks[name]


def capture(send: Callable[[], Any], capture_callbacks: Any) -> list[PendingCall]:
    """The calls a send would publish at commit, without committing."""
    with capture_callbacks() as callbacks:
        send()
    return [callback for callback in callbacks if isinstance(callback, PendingCall)]


def test_worker_options_come_from_settings_then_from_celery() -> None:
    saved = task(ARTICLE_SAVED)
    # At-least-once by default (issue 8), whatever the Celery app's task_acks_late says.
    assert current_app.conf.task_acks_late is False
    assert saved.acks_late is True and saved.reject_on_worker_lost is True
    assert saved.max_retries == 3 and saved.default_retry_delay == 180  # Celery's defaults
    handlers = {
        ARTICLE_SAVED: {
            "acks_late": False,
            "reject_on_worker_lost": False,
            "rate_limit": "5/s",
            "time_limit": 30,
            "soft_time_limit": 20,
            "max_retries": None,
        }
    }
    with override_settings(DEFERRED_SIGNALS={"HANDLERS": handlers}):
        assert saved.acks_late is False and saved.reject_on_worker_lost is False
        assert saved.rate_limit == "5/s"
        assert (saved.time_limit, saved.soft_time_limit) == (30, 20)
        assert saved.max_retries is None  # retry forever
    assert saved.acks_late is True


def test_worker_options_follow_celery_settings_and_app_conf() -> None:
    """Unset options fall back to the Celery app's configuration, however it changes."""
    saved = task(ARTICLE_SAVED)
    assert saved.time_limit is None and saved.rate_limit is None
    with override_settings(CELERY_TASK_TIME_LIMIT=40, CELERY_TASK_DEFAULT_RATE_LIMIT="2/s"):
        assert saved.time_limit == 40 and saved.rate_limit == "2/s"
    assert saved.time_limit is None
    conf = current_app.conf
    had, previous = "task_soft_time_limit" in conf.changes, conf.changes.get("task_soft_time_limit")
    conf.task_soft_time_limit = 15  # set on app.conf itself, not through Django settings
    try:
        assert saved.soft_time_limit == 15
        conf.task_soft_time_limit = 16
        assert saved.soft_time_limit == 16
    finally:
        if had:
            conf.changes["task_soft_time_limit"] = previous
        else:
            del conf.changes["task_soft_time_limit"]
    assert saved.soft_time_limit is None


def test_worker_options_follow_a_handler_registered_again() -> None:
    from deferred_signals import registry

    saved = task(ARTICLE_SAVED)
    handler = registry.get(ARTICLE_SAVED)
    assert handler is not None and saved.max_retries == 3
    registry.unregister(ARTICLE_SAVED)
    try:
        assert saved.max_retries == 3  # Celery's default, with no handler behind the task
        registry.register(replace(handler, options={**handler.options, "max_retries": 7}))
        assert saved.max_retries == 7 and saved.handler is not handler
    finally:
        registry.unregister(ARTICLE_SAVED)
        registry.register(handler)
    assert saved.max_retries == 3 and saved.handler is handler


def test_remote_control_can_still_set_a_rate_limit() -> None:
    saved = task(ARTICLE_SAVED)
    saved.rate_limit = "1/m"  # what `celery control rate_limit` does on a worker
    try:
        assert saved.rate_limit == "1/m"
    finally:
        saved._overrides = {}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("options", "fail_times", "attempts", "succeeds"),
    [
        ({"max_retries": 3, "default_retry_delay": 0}, 2, 3, True),
        ({"max_retries": 1, "default_retry_delay": 0}, 5, 2, False),
        ({"max_retries": 4, "retry_backoff": True, "retry_backoff_max": 0}, 3, 4, True),
        (
            {"max_retries": 4, "retry_backoff": 2, "retry_backoff_max": 0, "retry_jitter": False},
            1,
            2,
            True,
        ),
        (
            {"max_retries": 3, "dont_autoretry_for": ["tests.testapp.handlers.FlakyError"]},
            2,
            1,
            False,
        ),
        ({"max_retries": 3, "autoretry_for": []}, 2, 1, False),
    ],
)
def test_retries_follow_the_merged_options(
    django_capture_on_commit_callbacks: Any,
    options: dict[str, Any],
    fail_times: int,
    attempts: int,
    succeeds: bool,
) -> None:
    handler_options = {"autoretry_for": ["tests.testapp.handlers.FlakyError"], **options}
    (call,) = capture(
        lambda: flaky_signal.send(sender=None, key="k", fail_times=fail_times),
        django_capture_on_commit_callbacks,
    )
    with override_settings(DEFERRED_SIGNALS={"HANDLERS": {FLAKY: handler_options}}):
        result = task(FLAKY).apply(kwargs=call.body, task_id=call.id)
    assert Attempt.objects.get(key="k").count == attempts
    assert result.successful() is succeeds
    if not succeeds:
        assert isinstance(result.result, FlakyError)


def test_a_malformed_message_is_rejected_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    with override_settings(
        DEFERRED_SIGNALS={"HANDLERS": {FLAKY: {"autoretry_for": ["Exception"]}}}
    ):
        result = task(FLAKY).apply(kwargs={"v": 1}, task_id="forged-1")
    assert isinstance(result.result, Reject)
    assert f"Rejected message forged-1 for deferred handler task {FLAKY}" in caplog.text


def test_a_task_whose_handler_is_gone_rejects_its_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from deferred_signals import registry

    handler = registry.get(FLAKY)
    assert handler is not None
    registry.unregister(FLAKY)
    try:
        result = task(FLAKY).apply(kwargs={}, task_id="orphan")
    finally:
        registry.register(handler)
    assert isinstance(result.result, Reject)
    assert "no deferred handler is registered" in caplog.text
