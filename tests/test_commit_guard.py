"""Your own ``on_commit`` callback raises at commit: no committed deferred call is lost.

Django runs a commit's callbacks in order and stops at the first one that raises what it
does not catch (any exception of a callback registered without ``robust=True``, Django's
default; a ``BaseException`` of any): every callback after it is dropped, the package's
included. Each committed call must still reach the broker or the outbox, your exception must
come out of the ``atomic`` block as it was, and your callbacks keep Django's semantics.
Real transactions (SQLite or PostgreSQL), a real Redis.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import django
import pytest
from django.db import transaction

from deferred_signals.models import OutboxCall
from tests.conftest import Interrupted, Queue
from tests.testapp.models import Author
from tests.testapp.signals import row_touched, user_registered

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


def outbox_ids(using: str = "default") -> set[str]:
    return set(OutboxCall.objects.using(using).values_list("id", flat=True))


def published(queue: Queue) -> list[str]:
    return [message["headers"]["id"] for message in queue.messages()]


def boom_raising(error: BaseException) -> Any:
    def boom() -> None:
        raise error

    return boom


def test_your_failing_callback_before_the_calls_loses_none_of_them(
    redis_queue: Queue, call_ids: list[str]
) -> None:
    """``on_commit(f)`` (not robust, Django's default) raising before the calls: the
    calls are published, in order, and ``f``'s exception leaves the block, the same object."""
    error = RuntimeError("the broker is down, says your task.delay()")
    with pytest.raises(RuntimeError) as raised, transaction.atomic():
        Author.objects.create(name="committed")
        transaction.on_commit(boom_raising(error))
        user_registered.send(sender=None, i=0)
        user_registered.send(sender=None, i=1)
    assert raised.value is error
    assert Author.objects.filter(name="committed").exists()
    assert len(call_ids) == 2
    assert published(redis_queue) == call_ids, "published at once, in order"
    assert not outbox_ids()


def test_your_failing_callback_between_batches_loses_none_of_the_later_ones(
    redis_queue: Queue, call_ids: list[str]
) -> None:
    """Registered after a first batch, before a savepoint's batch, coalesced calls (whose
    finisher comes last) and calls after a rolled-back savepoint: all committed calls are
    published; your callbacks after the failing one are dropped, as Django drops them."""
    ran: list[str] = []
    error = RuntimeError("yours")
    with pytest.raises(RuntimeError) as raised, transaction.atomic():
        author = Author.objects.create(name="between")
        user_registered.send(sender=None, i=0)
        transaction.on_commit(lambda: ran.append("before"))
        transaction.on_commit(boom_raising(error))
        transaction.on_commit(lambda: ran.append("after"))
        with transaction.atomic():
            user_registered.send(sender=None, i=1)
        rolled_back = len(call_ids)
        try:
            with transaction.atomic():
                user_registered.send(sender=None, i=99)
                transaction.on_commit(lambda: ran.append("rolled back"))
                raise ValueError
        except ValueError:
            pass
        row_touched.send(sender=Author, instance=author, label="a", created=True)
        row_touched.send(sender=Author, instance=author, label="b", created=False)
        user_registered.send(sender=None, i=2)
    assert raised.value is error
    assert ran == ["before"], "Django's semantics: dropped after the failing callback"
    committed = [id for n, id in enumerate(call_ids) if n != rolled_back]
    committed = list(dict.fromkeys(committed))  # the coalesced calls share their group's id
    assert len(committed) == 4
    assert published(redis_queue) == committed, "every committed call, in order"
    assert not outbox_ids()


def test_a_base_exception_from_your_robust_callback_spills_the_calls(
    redis_queue: Queue, call_ids: list[str]
) -> None:
    """A ``KeyboardInterrupt`` or gevent ``Timeout`` stops even a robust callback's loop: the
    calls go to the outbox at once (no time spent on the broker), the interruption goes on."""
    interruption = Interrupted()
    with pytest.raises(Interrupted) as raised, transaction.atomic():
        transaction.on_commit(boom_raising(interruption), robust=True)
        user_registered.send(sender=None, i=0)
        user_registered.send(sender=None, i=1)
    assert raised.value is interruption
    assert not published(redis_queue)
    assert outbox_ids() == set(call_ids) and len(call_ids) == 2


def test_your_robust_callback_fails_under_its_own_name_and_the_commit_goes_on(
    redis_queue: Queue, call_ids: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Django logs a robust callback's exception, naming it, and runs the next callbacks:
    it does so still, under your callback's name, not the package's."""
    ran: list[str] = []

    def flaky_callback() -> None:
        raise RuntimeError("logged")

    with caplog.at_level(logging.ERROR, logger="django.db.backends.base"), transaction.atomic():
        user_registered.send(sender=None, i=0)
        transaction.on_commit(flaky_callback, robust=True)
        transaction.on_commit(lambda: ran.append("next"))
        with transaction.atomic():
            user_registered.send(sender=None, i=1)
    assert ran == ["next"]
    assert published(redis_queue) == call_ids and len(call_ids) == 2
    logged = [record.getMessage() for record in caplog.records]
    assert any(flaky_callback.__qualname__ in message for message in logged), logged


def test_your_robust_partial_that_fails_loses_no_call(
    redis_queue: Queue, call_ids: list[str]
) -> None:
    """A robust ``functools.partial`` that raises: Django < 6.1 fails logging it (no
    ``__qualname__``, ticket #36487) and its loop stops with an ``AttributeError``; 6.1 logs
    it and goes on. Either way Django's, and the calls are published."""
    callback = functools.partial(boom_raising(RuntimeError("partial")))
    if django.VERSION < (6, 1):
        as_django: Any = pytest.raises(AttributeError, match="__qualname__")
    else:
        as_django = contextlib.nullcontext()
    with as_django, transaction.atomic():
        transaction.on_commit(callback, robust=True)
        user_registered.send(sender=None, i=0)
        transaction.on_commit(callback, robust=True)
        with transaction.atomic():
            user_registered.send(sender=None, i=1)
    assert published(redis_queue) == call_ids and len(call_ids) == 2


def test_calls_waiting_for_your_failing_commit_on_another_database_are_published(
    redis_queue: Queue, call_ids: list[str]
) -> None:
    """A call on ``default`` for an instance written in ``other``'s open transaction waits for
    ``other``'s commit, whose own callback (registered before) raises."""
    error = RuntimeError("on other")
    with pytest.raises(RuntimeError) as raised, transaction.atomic(using="other"):
        author = Author.objects.using("other").create(name="elsewhere")
        transaction.on_commit(boom_raising(error), using="other")
        with transaction.atomic():
            user_registered.send(sender=None, i=1, instance=author)
        assert not published(redis_queue), "waits for other's commit"
    assert raised.value is error
    assert published(redis_queue) == call_ids and len(call_ids) == 1


def test_a_capture_counting_callbacks_is_not_shifted(
    redis_queue: Queue, call_ids: list[str], django_capture_on_commit_callbacks: Any
) -> None:
    """A capture inside a real transaction counts the callbacks registered after it started:
    yours registered before it stays out of it, and runs once, at commit."""
    ran: list[str] = []
    with transaction.atomic():
        transaction.on_commit(lambda: ran.append("yours"))
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            user_registered.send(sender=None, i=0)
        assert ran == [], "not shifted into the capture"
        assert all(getattr(callback, "__wrapped__", None) is None for callback in callbacks)
    assert ran == ["yours"]
    assert published(redis_queue) == call_ids


@pytest.mark.django_db(transaction=False)
def test_a_testcase_capture_sees_what_it_saw(django_capture_on_commit_callbacks: Any) -> None:
    """In a ``TestCase`` (never committing) nothing is added nor wrapped: a capture gets
    exactly the calls' callbacks, yours before it untouched."""

    def yours() -> None:
        pass

    transaction.on_commit(yours)
    with django_capture_on_commit_callbacks() as callbacks, transaction.atomic():
        transaction.on_commit(yours)
        user_registered.send(sender=None, i=0)
        user_registered.send(sender=None, i=1)
    assert callbacks[0] is yours
    assert [type(callback).__name__ for callback in callbacks[1:]] == ["PendingCall"] * 2
    connection = transaction.get_connection()
    assert [entry[1] for entry in connection.run_on_commit] == [yours, *callbacks]


def test_the_deferred_fixture_captures_calls_your_failing_callback_would_drop(
    deferred: Any, call_ids: list[str]
) -> None:
    """At a real commit the capture gets the calls through the same hand-over."""
    with pytest.raises(RuntimeError), transaction.atomic():
        transaction.on_commit(boom_raising(RuntimeError("yours")))
        user_registered.send(sender=None, i=0)
        user_registered.send(sender=None, i=1)
    assert [call.id for call in deferred.calls] == call_ids and len(call_ids) == 2


class Notifier:
    def __init__(self) -> None:
        self.sent = 0

    def notify(self) -> None:
        self.sent += 1


def on_commit_once(func: Any) -> None:
    """A common idiom: register a callback once per transaction, however often it is asked."""
    if func not in [entry[1] for entry in transaction.get_connection().run_on_commit]:
        transaction.on_commit(func)


def test_your_callback_wrapped_still_compares_and_reads_as_itself(
    redis_queue: Queue, call_ids: list[str]
) -> None:
    """Your callbacks registered before the first deferred call are wrapped: they still
    compare equal to what you registered (a bound method is a new object on each read) and
    read as it (a partial's ``func``, a method's ``__self__``), so a register-once idiom runs
    your callback once, not twice."""
    notifier = Notifier()

    def target(n: int) -> None:
        pass

    callback = functools.partial(target, 1)
    with transaction.atomic():
        on_commit_once(notifier.notify)
        transaction.on_commit(callback)
        user_registered.send(sender=None, i=0)
        on_commit_once(notifier.notify)
        entries = [entry[1] for entry in transaction.get_connection().run_on_commit]
        assert entries[0] == notifier.notify and entries[0].__self__ is notifier
        assert entries[1] == callback and entries[1].func is target
        assert entries[1].args == (1,)
    assert notifier.sent == 1, "registered once, run once"
    assert published(redis_queue) == call_ids and len(call_ids) == 1
