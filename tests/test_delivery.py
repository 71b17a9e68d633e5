"""Delivery guarantees under faults: real PostgreSQL, Redis, RabbitMQ and worker processes.

The request side publishes through a loopback proxy (tests/faults.py) in front of the real
broker, which the test cuts, black-holes or partitions; the worker consumes from the real
broker directly. Each test prints its figures: committed / delivered / lost / run twice, and
the slowest commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any

import pytest
from celery import current_app
from django.core.management import call_command
from django.db import connection, transaction
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import publisher
from deferred_signals.models import OutboxCall
from deferred_signals.relay import Relay
from tests.conftest import at_once, records, require, use_app, wait_for
from tests.faults import FaultProxy
from tests.testapp.models import Author
from tests.testapp.signals import user_registered
from tests.workers import PUBLISH_REDIS_URL, ROOT, Worker, make_app

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

PORTS = {"redis": 6379, "rabbitmq": 5672}
TIMEOUT = 2.0  # PUBLISH_TIMEOUT's default
MODES = ["on_commit", "outbox"]


@contextmanager
def publishing_through(
    proxy: FaultProxy, worker: Worker, settings: SettingsWrapper, **extra: Any
) -> Iterator[None]:
    """Deferred calls go to ``worker``'s queue through ``proxy``, with the package defaults."""
    app = make_app(f"proxied-{worker.broker}", proxy.url_for(worker.url))
    with use_app(app, settings, worker.queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": TIMEOUT,
            **extra,
        }
        yield


@pytest.fixture
def proxy(worker: Worker) -> Iterator[FaultProxy]:
    with FaultProxy(PORTS[worker.broker]) as running:
        yield running


def commit(label: str, i: int) -> float:
    """One transaction with a row and a deferred call; returns how long the commit took."""
    started = time.monotonic()
    with transaction.atomic():
        Author.objects.create(name=f"{label}-{i}")
        user_registered.send(sender=None, label=label, i=i)
    return time.monotonic() - started


def delivered(label: str) -> Counter[int]:
    return Counter(
        int(r.call["kwargs"]["i"]["repr"]) for r in records("user_event") if label in str(r.call)
    )


def relay_until_empty() -> int:
    """What ``manage.py deferred_signals relay`` does, in another process in production: so
    the cooldown this (request) process started after the failure does not apply to it."""
    published = 0
    for _ in range(20):
        publisher.cooldown.clear()
        published += Relay().run_once()
        if not OutboxCall.objects.exists():
            return published
        time.sleep(0.5)
    return published


def report(what: str, label: str, committed: int, durations: list[float]) -> Counter[int]:
    seen = wait_for(
        lambda: (found := delivered(label)) and len(found) >= committed and found,
        timeout=120,
        what=f"{committed} calls delivered",
    )
    time.sleep(0.5)  # a duplicate would land now
    seen = delivered(label)
    lost = committed - len(seen)
    twice = sum(1 for count in seen.values() if count > 1)
    print(
        f"\n{what}: committed {committed} / delivered {len(seen)} / lost {lost} / "
        f"run twice {twice}; slowest commit {max(durations):.2f} s"
    )
    return seen


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", ["refused", "black-holed"])
def test_a_broker_down_or_never_answering_loses_nothing(
    worker: Worker, proxy: FaultProxy, settings: SettingsWrapper, mode: str, fault: str
) -> None:
    label = uuid.uuid4().hex
    with publishing_through(proxy, worker, settings, DELIVERY=mode):
        proxy.refuse() if fault == "refused" else proxy.blackhole()
        durations = [commit(label, i) for i in range(100)]
        assert OutboxCall.objects.count() == 100
        proxy.forward()
        relay_until_empty()
    seen = report(f"broker {fault} ({worker.broker}, {mode})", label, 100, durations)
    assert set(seen) == set(range(100))
    assert max(durations) < TIMEOUT + 0.5
    # One slow commit per cooldown (5 s), not one per request.
    assert sum(1 for d in durations if d > 1.0) <= 1 + int(sum(durations) / 5)


@pytest.mark.parametrize("mode", MODES)
def test_a_partition_on_rabbitmq_loses_nothing(
    worker: Worker, proxy: FaultProxy, settings: SettingsWrapper, mode: str
) -> None:
    if worker.broker != "rabbitmq":
        pytest.skip("the partition test runs on RabbitMQ (confirms are what it proves)")
    label = uuid.uuid4().hex
    durations: list[float] = []
    with publishing_through(proxy, worker, settings, DELIVERY=mode):
        commit(label, 0)  # a live connection when the partition starts
        durations.append(0.0)
        proxy.hold()
        cut_at = time.monotonic()
        healed = False
        for i in range(1, 80):
            if not healed and time.monotonic() - cut_at > 8:
                proxy.reset_all()
                proxy.forward()
                healed = True
            durations.append(commit(label, i))
            time.sleep(0.1)
        if not healed:
            time.sleep(max(0.0, 8 - (time.monotonic() - cut_at)))
            proxy.reset_all()
            proxy.forward()
        relay_until_empty()
    seen = report(f"8 s partition on RabbitMQ ({mode})", label, 80, durations)
    assert set(seen) == set(range(80))
    assert max(durations) < TIMEOUT + 0.5


CHILD = """
import os, signal, sys
import django
import tests.celery_app  # the project's Celery app, as its __init__ would import it
django.setup()
from django.conf import settings
from django.db import transaction
settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "DELIVERY": "outbox", "OUTBOX_GRACE": 0}
from deferred_signals import publisher
def die(calls, deadline=None):  # after COMMIT, before the publish: the process is killed
    os.kill(os.getpid(), signal.SIGKILL)
publisher.publish = die
from tests.testapp.models import Author
from tests.testapp.signals import user_registered
with transaction.atomic():
    Author.objects.create(name=sys.argv[1])
    user_registered.send(sender=None, label=sys.argv[1], i=0)
print("not reached")
"""


def test_a_request_killed_between_commit_and_publish_loses_nothing(
    worker: Worker, settings: SettingsWrapper
) -> None:
    label = uuid.uuid4().hex
    env = {**worker.env, "DS_TEST_DB_DEFAULT": connection.settings_dict["NAME"]}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, label], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert Author.objects.filter(name=label).exists()  # committed...
    (row,) = OutboxCall.objects.all()  # ...and its call is in the outbox
    assert json.loads(row.body)["kwargs"]["label"] == label
    with FaultProxy(PORTS[worker.broker]) as proxy, publishing_through(proxy, worker, settings):
        relay_until_empty()
    seen = report(f"request SIGKILLed after COMMIT ({worker.broker})", label, 1, [0.0])
    assert seen == Counter({0: 1})


def test_two_relays_publish_each_row_once(postgres_only: None, settings: SettingsWrapper) -> None:
    require("redis")
    import redis

    url = PUBLISH_REDIS_URL
    queue = f"ds-relays-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    with FaultProxy(6379) as proxy, publishing_through(proxy, _FakeWorker(url, queue), settings):
        proxy.refuse()
        with transaction.atomic():
            for i in range(1000):
                user_registered.send(sender=None, label="relays", i=i)
        assert OutboxCall.objects.count() == 1000
        proxy.forward()
        publisher.cooldown.clear()  # relays are processes of their own
        counts = at_once(lambda: Relay(batch=50).run_once(), 2)
    messages = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    client.delete(queue)
    ids = Counter(m["headers"]["id"] for m in messages)
    print(
        f"\ntwo relays over 1,000 rows: published {counts}, messages {len(messages)}, "
        f"distinct ids {len(ids)}"
    )
    assert len(messages) == 1000 and len(ids) == 1000 and sum(counts) == 1000
    assert OutboxCall.objects.count() == 0


class _FakeWorker:
    """Just enough of ``Worker`` for publishing_through: a broker URL and a queue."""

    def __init__(self, url: str, queue: str) -> None:
        self.url, self.queue, self.broker = url, queue, "redis"


def test_relay_command_once(settings: SettingsWrapper) -> None:
    require("redis")
    url = PUBLISH_REDIS_URL
    queue = f"ds-relay-cmd-{uuid.uuid4().hex[:8]}"
    with FaultProxy(6379) as proxy, publishing_through(proxy, _FakeWorker(url, queue), settings):
        proxy.refuse()
        commit("cmd", 0)
        proxy.forward()
        publisher.cooldown.clear()
        out = StringIO()
        call_command("deferred_signals", "relay", "--once", stdout=out)
    assert "relayed 1 call(s)" in out.getvalue()


def test_a_message_the_broker_refuses_is_spilled_not_counted(settings: SettingsWrapper) -> None:
    """RabbitMQ nacks publishes to a full queue (x-overflow: reject-publish): only the
    confirmed message counts as published, the refused ones go to the outbox."""
    require("rabbitmq")
    from kombu import Queue

    from tests.workers import BROKERS

    name = f"ds-full-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    with (
        FaultProxy(5672) as proxy,
        publishing_through(proxy, _FakeWorker(BROKERS["rabbitmq"], name), settings),
    ):
        current_app.conf.task_queues = [queue]
        try:
            with transaction.atomic():
                for i in range(3):
                    user_registered.send(sender=None, label="full", i=i)
            spilled = sorted(
                json.loads(row.body)["kwargs"]["i"] for row in OutboxCall.objects.all()
            )
            with current_app.connection_for_write() as conn:
                _, messages, _ = queue(conn.default_channel).queue_declare(passive=True)
        finally:
            with current_app.connection_for_write() as conn:
                queue(conn.default_channel).delete()
    print(f"\nfull queue on RabbitMQ: published 3, confirmed {messages}, spilled {len(spilled)}")
    assert messages == 1 and spilled == [1, 2]


class SlowProxy:
    """Forwards to the broker; every chunk the broker sends back arrives ``delay`` s late."""

    def __init__(self, target: int, delay: float) -> None:
        import socket

        self.target, self.delay = target, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[Any] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self.sockets += [client, server]
            for src, dst, delay in ((client, server, 0.0), (server, client, self.delay)):
                threading.Thread(target=self._pipe, args=(src, dst, delay), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any, delay: float) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass

    def url_for(self, url: str) -> str:
        return url

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_slow_broker_holds_a_commit_no_longer_than_publish_timeout(
    settings: SettingsWrapper, broker: str
) -> None:
    """Each answer within the timeout, the connection's set-up (several round trips) well past
    it: the whole attempt is bounded, not each socket operation."""
    require(broker)
    from tests.workers import BROKERS

    timeout, delay = 1.0, 0.7
    proxy = SlowProxy(PORTS[broker], delay)
    url = BROKERS[broker].replace(f":{PORTS[broker]}", f":{proxy.port}")
    queue = f"ds-slow-{uuid.uuid4().hex[:8]}"
    try:
        with publishing_through(proxy, _FakeWorker(url, queue), settings):  # type: ignore[arg-type]
            settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "PUBLISH_TIMEOUT": timeout}
            started = time.monotonic()
            commit("slow", 0)
            took = time.monotonic() - started
    finally:
        proxy.close()
    (row,) = OutboxCall.objects.all()
    print(
        f"\nslow {broker} (every reply {delay} s late), PUBLISH_TIMEOUT {timeout} s: "
        f"commit took {took:.2f} s, call spilled ({row.last_error[:60]})"
    )
    assert took < timeout + 0.5
