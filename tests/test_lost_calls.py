"""Calls the pool stops from outside the handler, through Celery's own ``Request`` in this
process: its ``on_failure`` and ``on_timeout`` are what a prefork worker's main process runs
after a hard time limit or a lost child. The real workers (test_worker_lost.py) prove it
end to end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest.mock import Mock

import pytest
from billiard.einfo import ExceptionInfo
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import current_app
from celery import signals as celery_signals
from celery.contrib.testing.mocks import TaskMessage
from celery.worker.request import Request
from django.test import override_settings

from deferred_signals import signals
from deferred_signals.models import DeadLetter
from tests.testapp import tasks as plain_tasks
from tests.testapp.handlers import FlakyError

pytestmark = pytest.mark.django_db

OVERRUN = "tests.testapp.handlers.overrun"
BODY = {"v": 1, "signal": 0, "sender": None, "kwargs": {"key": "k", "seconds": 1}}


def request(name: str = OVERRUN, retries: int = 0, call_id: str | None = None) -> Request:
    message = TaskMessage(name, id=call_id or str(uuid.uuid4()), kwargs=BODY, retries=retries)
    req = Request(
        message, app=current_app, task=current_app.tasks[name], on_ack=Mock(), on_reject=Mock()
    )
    celery_signals.task_received.send(sender=None, request=req)
    return req


def failed(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


def hard_time_limit(req: Request) -> None:
    """What billiard's timeout handler does: the job fails, then the timeout callback runs."""
    req.on_failure(failed(TimeLimitExceeded(2)))
    req.on_timeout(False, 2)


@contextmanager
def dead_lettered() -> Iterator[list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    def receive(**kwargs: Any) -> None:
        sent.append(kwargs)

    signals.call_dead_lettered.connect(receive)
    try:
        yield sent
    finally:
        signals.call_dead_lettered.disconnect(receive)


def requeued(req: Request) -> bool:
    """Whether Celery put the message back on the queue (``on_reject(logger, errors, requeue)``)."""
    return any(call.args[2] for call in req._on_reject.call_args_list)


def test_a_hard_time_limit_is_one_dead_letter_with_the_message_to_replay() -> None:
    req = request(retries=2)
    with dead_lettered() as sent:
        hard_time_limit(req)  # Celery sends task_failure from both callbacks
    letter = DeadLetter.objects.get()
    assert (letter.call_id, letter.handler) == (req.id, OVERRUN)
    assert letter.exception == "billiard.exceptions.TimeLimitExceeded"
    assert letter.attempts == 3
    assert (
        letter.body == '{"v": 1, "signal": 0, "sender": null, "kwargs": {"key": "k", "seconds": 1}}'
    )
    assert [one["call_id"] for one in sent] == [req.id]
    assert req._on_ack.called and not requeued(req)


def test_a_replayed_call_stopped_again_updates_its_letter() -> None:
    first = request()
    hard_time_limit(first)
    with dead_lettered() as sent:
        hard_time_limit(request(call_id=first.id))  # the replay: a new delivery, the same id
    assert DeadLetter.objects.get().call_id == first.id
    assert len(sent) == 1


def test_a_timed_out_message_celery_requeues_is_no_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = current_app.tasks[OVERRUN]
    # Celery 5.7's own setting for timeouts; before it, one for failures and timeouts.
    name = "acks_on_timeout" if hasattr(task, "acks_on_timeout") else "acks_on_failure_or_timeout"
    monkeypatch.setattr(task, name, False)
    req = request()
    hard_time_limit(req)
    assert requeued(req)
    assert not DeadLetter.objects.exists()


def test_a_lost_child_is_requeued_by_default_and_no_dead_letter() -> None:
    req = request()
    req.on_failure(failed(WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL).")))
    assert requeued(req)
    assert not DeadLetter.objects.exists()


@pytest.mark.parametrize("options", [{"acks_late": False}, {"reject_on_worker_lost": False}])
def test_a_lost_child_whose_message_is_gone_is_a_dead_letter(options: dict[str, Any]) -> None:
    with override_settings(DEFERRED_SIGNALS={"HANDLERS": {OVERRUN: options}}):
        req = request()
        if not options.get("acks_late", True):
            req.on_accepted(pid=1, time_accepted=0.0)  # acknowledged before the handler ran
        req.on_failure(failed(WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL).")))
    assert not requeued(req)
    letter = DeadLetter.objects.get()
    assert (letter.call_id, letter.exception) == (req.id, "billiard.exceptions.WorkerLostError")
    assert letter.attempts == 1


def test_other_tasks_and_other_exceptions_are_left_alone() -> None:
    hard_time_limit(request(plain_tasks.plain_task.name))  # not a deferred handler's task
    # Raised inside the task: run_task kept its own letter, or retried.
    request().on_failure(failed(FlakyError("boom")))
    assert not DeadLetter.objects.exists()


def test_no_dead_letter_with_dead_letters_off() -> None:
    with override_settings(DEFERRED_SIGNALS={"DEAD_LETTERS": False}):
        hard_time_limit(request())
    assert not DeadLetter.objects.exists()


@pytest.mark.skipif(
    __import__("celery").VERSION < (5, 7), reason="before 5.7 it counts every delivery's retries"
)
def test_a_worker_pays_nothing_per_message_unless_a_lost_call_is_kept() -> None:
    from deferred_signals import lost_calls

    def listening() -> bool:
        import weakref

        return any(
            (ref() if isinstance(ref, weakref.ReferenceType) else ref)
            is lost_calls.on_task_received
            for _, ref in celery_signals.task_received.receivers
        )

    lost_calls._kept.clear()
    lost_calls._listen(False)
    assert not listening()
    req = request()
    hard_time_limit(req)
    assert DeadLetter.objects.filter(call_id=req.id).exists() and listening()
    request(call_id=req.id)  # its replay arrives: nothing kept any more
    assert not listening()


@pytest.mark.skipif(
    __import__("celery").VERSION < (5, 7), reason="before 5.7 it counts every delivery's retries"
)
def test_a_loss_kept_long_ago_is_forgotten_and_the_worker_stops_listening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Celery's two sends for one time limit come within moments: a kept call is forgotten
    after SAME_LOSS_SECONDS, so the receiver does not stay connected for good, and the
    same call lost again after that is kept again."""
    from deferred_signals import lost_calls

    lost_calls._kept.clear()
    lost_calls._listen(False)
    req = request()
    hard_time_limit(req)
    assert req.id in lost_calls._kept
    monkeypatch.setattr(lost_calls, "SAME_LOSS_SECONDS", 0.0)
    request()  # any other message: the old loss is forgotten, nothing is kept
    assert not lost_calls._kept
    assert not any(
        receiver() is lost_calls.on_task_received
        for _, receiver in celery_signals.task_received.receivers
        if isinstance(receiver, __import__("weakref").ReferenceType)
    )
    with dead_lettered() as sent:
        req.on_failure(failed(TimeLimitExceeded(2)))  # lost again, later: kept again
    assert len(sent) == 1
