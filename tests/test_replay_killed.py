"""A replay process SIGKILLed after it claimed a dead letter, before the broker confirmed the
publish: the call must still run, once (a real ``manage.py deferred_signals replay`` process,
its broker a proxy that swallows every byte, killed while it waits for the reply)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from django.db import connection, connections
from django.utils import timezone

from deferred_signals.models import DeadLetter, OutboxCall
from tests.conftest import Queue, require
from tests.faults import FaultProxy
from tests.test_operations import command, dead_letter, published
from tests.workers import PUBLISH_REDIS_URL, ROOT

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_replay_killed_before_its_publish_is_confirmed_loses_no_letter(
    postgres_only: None, redis_queue: Queue
) -> None:
    require("redis")
    letter = dead_letter("killed mid-replay")
    with FaultProxy(6379) as proxy:
        proxy.blackhole()  # accepts the connection, never answers: the publish waits
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings_postgres",
            "DS_TEST_DB_DEFAULT": connection.settings_dict["NAME"],
            "DS_TEST_DB_OTHER": connections["other"].settings_dict["NAME"],
            "DS_TEST_BROKER": proxy.url_for(PUBLISH_REDIS_URL),
            "DS_TEST_QUEUE": redis_queue.name,
            "DS_TEST_EAGER": "0",
            "PYTHONPATH": str(ROOT),
        }
        replaying = subprocess.Popen(
            [sys.executable, "tests/manage.py", "deferred_signals", "replay", "--all"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            # Claimed (committed), and publishing: PUBLISH_TIMEOUT (10 s) is far off.
            while DeadLetter.objects.get().replayed_at is None or not proxy.connections:
                assert replaying.poll() is None, replaying.communicate()[0].decode()
                assert time.monotonic() < deadline, "the replay never claimed the letter"
                time.sleep(0.02)
            time.sleep(0.2)
            assert replaying.poll() is None, replaying.communicate()[0].decode()
            replaying.send_signal(signal.SIGKILL)
            replaying.wait(10)
        finally:
            if replaying.poll() is None:
                replaying.kill()
                replaying.wait()
    assert published(redis_queue) == []  # the broker never got it
    letter.refresh_from_db()
    # Claimed means the call is kept for the relay: never a letter marked replayed that
    # nobody will publish (before, `replay --all` skipped it for good).
    assert letter.replayed_at is None or OutboxCall.objects.filter(id=letter.call_id).exists()
    # What an operator does next, the broker back: the relay (once OUTBOX_GRACE is over,
    # which the row's due time says) and the same replay again.
    OutboxCall.objects.update(next_attempt_at=timezone.now())
    command("relay", "--once")
    command("replay", "--all")
    assert [task_id for task_id, _ in published(redis_queue)] == [letter.call_id]
    assert not OutboxCall.objects.exists()
    assert DeadLetter.objects.get().replayed_at is not None
