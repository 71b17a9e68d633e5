"""End to end, calls the pool stops from outside: a hard time limit, a child killed when its
message is not redelivered. Each is kept as a dead letter, once, and runs again on replay;
a message Celery redelivers is never a dead letter too. Real ``celery worker`` processes
(prefork), PostgreSQL, Redis/RabbitMQ.

Each test prints its figures (``pytest -s`` shows them).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals.models import DeadLetter
from deferred_signals.replay import replay
from tests.conftest import current, on_postgres, records, require, wait_for
from tests.testapp.models import Attempt
from tests.testapp.signals import lossy_signal, overrun_signal, soft_overrun_signal
from tests.workers import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

HANDLERS = "tests.testapp.handlers"


def unique() -> str:
    return uuid.uuid4().hex[:12]


def runs(handler: str, key: str) -> list[dict[str, Any]]:
    return [r.call for r in records(handler) if r.call["key"] == key]


def attempts(handler: str, key: str) -> int:
    found = Attempt.objects.filter(key=f"{handler}-{key}").first()
    return found.count if found else 0


def letters(handler: str, key: str) -> list[DeadLetter]:
    return list(DeadLetter.objects.filter(handler=f"{HANDLERS}.{handler}", body__contains=key))


def test_a_call_past_its_hard_time_limit_is_one_dead_letter_to_replay(
    deferred_to: Worker,
) -> None:
    key = unique()
    overrun_signal.send(sender=None, key=key, seconds=60)  # autocommit: published at once
    (letter,) = wait_for(lambda: letters("overrun", key), timeout=60, what="the dead letter")
    time.sleep(3)  # a second record, or a redelivery, would show by now
    assert [one.pk for one in letters("overrun", key)] == [letter.pk]
    assert letter.exception == "billiard.exceptions.TimeLimitExceeded"
    assert letter.attempts == 1 and letter.replayed_at is None
    assert runs("overrun", key) == [] and attempts("overrun", key) == 1  # not redelivered
    # Once, though Celery sends task_failure twice (the test settings' console handler echoes
    # the line without Celery's prefix).
    logged = deferred_to.log().count(
        f"/MainProcess] Deferred handler {letter.handler} [{letter.call_id}] was stopped by its "
        "hard time limit"
    )

    out = StringIO()
    call_command("deferred_signals", "replay", str(letter.id), stdout=out)
    assert "replayed 1 dead letter(s)" in out.getvalue()
    (rerun,) = wait_for(lambda: runs("overrun", key), timeout=60, what="the replayed call")
    assert rerun["id"] == letter.call_id and attempts("overrun", key) == 2
    print(
        f"\n[{deferred_to.broker}] hard time limit: dead letters {len(letters('overrun', key))}, "
        f"logged {logged}, replayed and completed 1/1, same call id"
    )
    assert logged == 1


def test_a_soft_time_limit_fails_the_call_through_the_handler_path(deferred_to: Worker) -> None:
    key = unique()
    soft_overrun_signal.send(sender=None, key=key, seconds=60)
    (letter,) = wait_for(lambda: letters("soft_overrun", key), timeout=60, what="the dead letter")
    assert letter.exception == "billiard.exceptions.SoftTimeLimitExceeded"
    assert "time.sleep(seconds)" in letter.traceback  # raised inside the handler, in the child
    replay([letter])
    (rerun,) = wait_for(lambda: runs("soft_overrun", key), timeout=60, what="the replayed call")
    assert rerun["id"] == letter.call_id
    print(f"\n[{deferred_to.broker}] soft time limit: dead letter 1, replayed and completed 1/1")


def test_a_child_killed_when_its_message_is_not_redelivered_is_a_dead_letter(
    deferred_to: Worker,
) -> None:
    key = unique()
    names = ("lossy_acked_early", "lossy_not_requeued")
    lossy_signal.send(sender=None, key=key, seconds=60)  # one call to each handler
    for name in names:
        wait_for(lambda name=name: runs(f"{name}_start", key), what=f"{name} to start")
        pid = next(r.pid for r in records(f"{name}_start") if r.call["key"] == key)
        os.kill(pid, signal.SIGKILL)  # a worker child, mid-handler
    found = {
        name: wait_for(lambda name=name: letters(name, key), timeout=60, what=f"{name}'s letter")
        for name in names
    }
    time.sleep(3)  # a redelivery would have started the handler again by now
    for name in names:
        (letter,) = letters(name, key)
        assert letter == found[name][0]
        assert letter.exception == "billiard.exceptions.WorkerLostError"
        assert letter.attempts == 1
        assert attempts(name, key) == 1 and runs(name, key) == []
    replay(letter for (letter,) in found.values())
    for name in names:
        (rerun,) = wait_for(lambda name=name: runs(name, key), timeout=60, what=f"{name} rerun")
        assert rerun["id"] == found[name][0].call_id
    print(
        f"\n[{deferred_to.broker}] children SIGKILLed, message not redelivered (acks_late=False; "
        "reject_on_worker_lost=False): dead letters 2/2, replayed and completed 2/2"
    )


def test_a_timed_out_call_celery_requeues_is_no_dead_letter(
    settings: SettingsWrapper, tmp_path: Any
) -> None:
    """``task_acks_on_timeout=False``: the message goes back to the queue and runs again."""
    import celery

    if celery.VERSION < (5, 7):
        pytest.skip(
            "Celery before 5.7 has no task_acks_on_timeout: with acks_on_failure_or_timeout "
            "off it leaves a timed-out message unacknowledged until the visibility timeout"
        )
    if not on_postgres():
        pytest.skip("end-to-end: runs in make test's PostgreSQL pass")
    require("redis")
    names = {alias: connections[alias].settings_dict["NAME"] for alias in ("default", "other")}
    worker = Worker("redis", names, tmp_path, env={"DS_TEST_REQUEUE_TIMEOUTS": "1"})
    worker.start()
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS, "EAGER": False, "DEFAULTS": {"queue": worker.queue}
    }  # fmt: skip
    try:
        with current(worker.app):
            key = unique()
            overrun_signal.send(sender=None, key=key, seconds=60)
            wait_for(lambda: runs("overrun", key), timeout=60, what="the requeued run")
            time.sleep(2)
            dead = letters("overrun", key)
            print(
                f"\n[redis] hard time limit, requeued: runs {attempts('overrun', key)}, "
                f"completed 1, dead letters {len(dead)}"
            )
            assert attempts("overrun", key) == 2 and dead == []
    finally:
        worker.stop()
        worker.delete_queue()
