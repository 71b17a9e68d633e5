"""What deferred_signals logs: one line per publish batch, retry, failure, skip and spill, each
naming the handler and the call id; at INFO and above, never a value of the call's arguments
(they may hold personal data). Exception texts may quote them, so only their types show there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from celery import current_app
from django.db import transaction
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import registry, signals
from deferred_signals.execution import decode_call
from tests.conftest import use_app
from tests.testapp.models import Article
from tests.testapp.signals import flaky_signal, user_registered
from tests.workers import make_app

pytestmark = pytest.mark.django_db(transaction=True)

#: The personal data of this test: it must never reach a log line at INFO or above.
SECRET = "ann.secret@example.com"
FLAKY = "tests.testapp.handlers.flaky"
DB_FLAKY = "tests.testapp.handlers.db_flaky"


def message(**kwargs: Any) -> dict[str, Any]:
    return {"v": 1, "signal": 0, "sender": None, "kwargs": kwargs}


@pytest.fixture
def call_ids() -> Iterator[dict[str, str]]:
    """The call id of each deferred handler's latest call, as our own signal tells it."""
    seen: dict[str, str] = {}

    def deferred(sender: Any, handler: str, call_id: str, **kwargs: Any) -> None:
        seen[handler] = call_id

    signals.call_deferred.connect(deferred, weak=False)
    yield seen
    signals.call_deferred.disconnect(deferred)


def typical_run(settings: SettingsWrapper, call_ids: dict[str, str]) -> dict[str, str]:
    """Publish, spill, retry, fail, skip: each with the secret among the call's arguments."""
    ids: dict[str, str] = {}
    queue = {"EAGER": False, "DEFAULTS": {"queue": "ds-logging"}}
    with override(settings, **queue), transaction.atomic():  # the in-memory broker
        user_registered.send(sender=None, email=SECRET)
    ids["published"] = call_ids["tests.user_event"]
    # The worker side: FlakyError's text and the OperationalError's both quote the secret.
    current_app.tasks[FLAKY].apply(kwargs=message(key=SECRET, fail_times=100), task_id="flaky-1")
    with override(settings, HANDLERS={DB_FLAKY: {"db_retry_window": 900}}):
        current_app.tasks[DB_FLAKY].apply(
            kwargs=message(key=f"db {SECRET}", outages=1, failures=0), task_id="db-1"
        )
    counted = registry.get("tests.testapp.handlers.counted")
    assert counted is not None
    for _ in range(2):
        decode_call(counted, message(key=SECRET)).run("counted-1")
    with transaction.atomic():  # EAGER: the row is gone when the handler runs
        article = Article.objects.create(title=SECRET)
        article.delete()
    ids["missing"] = call_ids["tests.testapp.handlers.article_saved"]
    with transaction.atomic():  # EAGER, failing once
        flaky_signal.send(sender=None, key=f"eager {SECRET}", fail_times=1)
    ids["eager"] = call_ids[FLAKY]
    # Last: the broker's failure starts a cooldown in this process.
    with use_app(make_app("down", "redis://127.0.0.1:1/0"), settings, "ds-down"):
        with transaction.atomic():
            user_registered.send(sender=None, email=SECRET)
        ids["spilled"] = call_ids["tests.user_event"]
    return ids


def override(settings: SettingsWrapper, **values: Any) -> Any:
    from django.test import override_settings

    return override_settings(DEFERRED_SIGNALS={**settings.DEFERRED_SIGNALS, **values})


def test_one_line_per_event_and_no_argument_value_at_info_or_above(
    caplog: pytest.LogCaptureFixture, settings: SettingsWrapper, call_ids: dict[str, str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger="deferred_signals"):
        ids = typical_run(settings, call_ids)
    ours = [r for r in caplog.records if r.name.split(".")[0] == "deferred_signals"]
    text = logging.Formatter()  # the message, and the traceback if the record has one

    loud = [r for r in ours if r.levelno >= logging.INFO]
    leaks = [text.format(r) for r in loud if SECRET in text.format(r)]
    assert leaks == []

    def lines(*words: str) -> list[str]:
        return [r.getMessage() for r in loud if all(word in r.getMessage() for word in words)]

    assert len(lines("published 1 call(s)", "tests.user_event", ids["published"])) == 1
    assert len(lines("spilled", "tests.user_event", ids["spilled"])) == 1
    for attempt in (1, 2, 3):
        (retry,) = lines(FLAKY, "[flaky-1]", f"failed on attempt {attempt} ")
        assert "tests.testapp.handlers.FlakyError" in retry and "retry in" in retry
    assert len(lines(FLAKY, "[flaky-1]", "failed for good on attempt 4")) == 1
    assert len(lines(DB_FLAKY, "[db-1]", "database error, retry in")) == 1
    assert len(lines("Skipped", "tests.testapp.handlers.counted", "counted-1")) == 1
    assert len(lines("Skipped", "article_saved", ids["missing"], "no longer exists")) == 1
    assert len(lines(FLAKY, ids["eager"], "failed (EAGER)", "FlakyError")) == 1
    # The capture sees everything: the EAGER traceback, at DEBUG, does quote the secret.
    assert any(SECRET in text.format(r) for r in ours if r.levelno == logging.DEBUG)
