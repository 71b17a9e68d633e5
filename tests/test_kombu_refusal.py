"""A list of another type (``WRONGTYPE``) met by kombu's own pipeline, for the calls the
package's push does not write (a route with ``compression``, a queue with ``x-expires``):
kombu wraps Redis's reply in ``BatchPublishError``, which is a refusal of that queue's
calls, not an outage. Redis is kept busy (``DEBUG SLEEP``, as a slow script or a big
``DEL`` would) so that the first attempt outlasts the quick retry on a fresh connection,
whose new declare would otherwise meet the refusal first."""

from __future__ import annotations

import datetime
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import publisher
from deferred_signals.models import DeadLetter, OutboxCall
from deferred_signals.outbox import body_text
from deferred_signals.relay import Relay
from tests.conftest import missing, use_app
from tests.private_redis import PrivateRedis
from tests.test_broker_replies import OTHER, commit, labels
from tests.testapp.signals import slow_signal, user_registered
from tests.workers import make_app

pytestmark = pytest.mark.django_db(transaction=True)

EVENT = "tests.user_event"
BUSY = 0.5  # seconds Redis is busy: longer than the quick retry's window (0.25 s)


@pytest.fixture
def debug_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server that takes ``DEBUG SLEEP``."""
    if shutil.which("redis-server") is None:
        missing("no redis-server binary here; install it with: apt-get install redis-server")
    server = PrivateRedis(tmp_path, "--enable-debug-command", "yes")
    yield server
    server.stop()


@contextmanager
def busy(server: Any) -> Iterator[None]:
    """Redis runs one slow command of another client meanwhile."""
    import redis

    sleeper = redis.Redis(port=server.port)
    thread = threading.Thread(target=sleeper.execute_command, args=("DEBUG", "SLEEP", BUSY))
    thread.start()
    time.sleep(0.05)  # the sleep has started: every other client waits
    try:
        yield
    finally:
        thread.join()
        sleeper.close()


@contextmanager
def wrong_type_route(server: Any, settings: SettingsWrapper, mode: str) -> Iterator[str]:
    queue, other = (f"ds-kombu-{uuid.uuid4().hex[:8]}" for _ in range(2))
    app = make_app("private-redis", server.url)
    app.conf.task_routes = {OTHER: {"compression": "zlib"}}  # not a shape the push writes
    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": 2.0,
            "DELIVERY": mode,
            "RELAY_MAX_ATTEMPTS": 2,
            "HANDLERS": {OTHER: {"queue": other}},
        }
        commit("before", 100)  # connected, both queues declared (cached per channel)
        with transaction.atomic():
            slow_signal.send(sender=None, i=101)
        server.client.delete(queue, other)
        server.client.set(other, "not a list")
        yield queue
    publisher.cooldown.clear()


@pytest.mark.parametrize("mode", ["on_commit", "outbox"])
def test_a_refusal_through_kombus_pipeline_starts_no_cooldown(
    debug_redis: PrivateRedis, settings: SettingsWrapper, mode: str
) -> None:
    server = debug_redis
    with wrong_type_route(server, settings, mode) as queue:
        with busy(server), transaction.atomic():
            user_registered.send(sender=None, label="mixed", i=0)
            slow_signal.send(sender=None, i=1)  # kombu's pipeline: WRONGTYPE
        kept = list(OutboxCall.objects.values_list("handler", flat=True))
        assert kept == [OTHER], "the refused call is kept, only it"
        assert not publisher.cooldown.active(), "a refused list is no outage"
        commit("after", 2)  # another handler's call: published, not spilled
        assert labels(server.client, queue) == {0: 1, 2: 1}
        assert list(OutboxCall.objects.values_list("handler", flat=True)) == [OTHER]


def test_the_relay_counts_a_refusal_through_kombus_pipeline_as_an_attempt(
    debug_redis: PrivateRedis, settings: SettingsWrapper
) -> None:
    """A row refused that way waited each round as if the broker were down, without
    counting an attempt: never a dead letter, and the relay's cooldown held every other
    row back too."""
    server = debug_redis
    with wrong_type_route(server, settings, "on_commit") as queue:
        now = timezone.now() - datetime.timedelta(seconds=1)
        for n, (handler, i) in enumerate([(EVENT, 0), (OTHER, 1)]):
            OutboxCall.objects.create(
                id=str(uuid.uuid4()),
                handler=handler,
                body=body_text({"v": 1, "signal": 0, "sender": None, "kwargs": {"i": i}}),
                next_attempt_at=now + datetime.timedelta(milliseconds=n),
            )
        for _ in range(2):  # RELAY_MAX_ATTEMPTS
            publisher.cooldown.clear()  # a relay process of its own each time
            with busy(server):
                Relay(databases=["default"]).run_once()
            OutboxCall.objects.update(next_attempt_at=timezone.now())
        assert labels(server.client, queue) == {0: 1}
        assert not OutboxCall.objects.exists(), "the refused row is a dead letter by now"
        assert list(DeadLetter.objects.values_list("handler", flat=True)) == [OTHER]
