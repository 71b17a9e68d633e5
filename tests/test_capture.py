"""``captureOnCommitCallbacks(execute=True)`` in ``TestCase``-style tests (never committed)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import records
from tests.testapp.models import Article

pytestmark = pytest.mark.django_db  # one transaction per test, rolled back, as in TestCase


def titles() -> list[str]:
    return [
        r.call["kwargs"]["instance"]["fields"]["title"]["repr"] for r in records("article_saved")
    ]


def test_calls_made_inside_the_capture_run(django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        Article.objects.create(title="inside")
    assert titles() == ["'inside'"]
    assert callbacks  # what Django's own tool reports


def test_a_capture_runs_only_the_calls_made_inside_it(
    django_capture_on_commit_callbacks: Any,
) -> None:
    Article.objects.create(title="setUp")  # e.g. a fixture made in setUp, outside the capture
    with django_capture_on_commit_callbacks(execute=True):
        Article.objects.create(title="inside")
    # Only what was sent inside the capture runs, as with Django's own callbacks; the
    # earlier call shares the batch, but it belongs to a commit that never comes.
    assert titles() == ["'inside'"]


def test_two_captures_in_one_test(django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        Article.objects.create(title="first")
    with django_capture_on_commit_callbacks(execute=True):
        Article.objects.create(title="second")
    assert titles() == ["'first'", "'second'"]


def test_without_execute_nothing_runs(django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks() as callbacks:
        Article.objects.create(title="captured only")
    assert callbacks and records() == []


def test_without_execute_the_first_captured_callback_runs_the_batch(
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks() as callbacks:
        Article.objects.create(title="a")
        Article.objects.create(title="b")
    callbacks[0]()  # the usual idiom: run what was captured
    assert titles() == ["'a'", "'b'"]
    for callback in callbacks:  # the other idiom: run them all; nothing runs twice
        callback()
    assert titles() == ["'a'", "'b'"]


def test_calls_before_a_capture_run_when_their_callbacks_run(
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks() as outer:
        Article.objects.create(title="before")
        with django_capture_on_commit_callbacks(execute=True):
            Article.objects.create(title="inside")
        assert titles() == ["'inside'"]
    for callback in outer:  # the outer "commit": the earlier call now, nothing twice
        callback()
    assert titles() == ["'inside'", "'before'"]
