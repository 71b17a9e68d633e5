"""A broker that answers a publish, but not with a yes: Redis error replies, a paused Redis,
a RabbitMQ queue full by policy.

Each Redis test runs a private ``redis-server`` of its own (started and stopped here, on a
free loopback port, no persistence), so that it can be filled, made a replica, given a
password or paused without touching the shared server other tests use; the RabbitMQ test
works in a vhost of its own, with a policy of its own, deleted after. The request side commits real
transactions and publishes to it; what reached the queue is read back by call id, so each
test prints committed / published / lost / published twice, and the slowest commit.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from queue import Queue
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import publisher
from deferred_signals.models import OutboxCall
from deferred_signals.outbox import body_text
from deferred_signals.relay import Relay
from tests.conftest import missing, require, use_app
from tests.private_redis import (
    PrivateRedis,
    misconf,
    misconf_over,
    oom,
    oom_over,
    read_only,
    read_only_over,
    wrong_password,
    wrong_password_over,
)
from tests.testapp.models import Author
from tests.testapp.signals import slow_signal, user_registered
from tests.workers import make_app

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 2.0  # PUBLISH_TIMEOUT's default
MODES = ["on_commit", "outbox"]
OTHER = "tests.testapp.handlers.marker"  # slow_signal's handler, routed to a queue of its own


def commit(label: str, i: int, **extra: Any) -> float:
    """One transaction with a row and a deferred call; returns how long the commit took."""
    started = time.monotonic()
    with transaction.atomic():
        Author.objects.create(name=f"{label}-{i}")
        user_registered.send(sender=None, label=label, i=i, **extra)
    return time.monotonic() - started


def published(client: Any, *queues: str) -> Counter[str]:
    """How many times each call id sits in ``queues``."""
    ids: Counter[str] = Counter()
    for queue in queues:
        for raw in client.lrange(queue, 0, -1):
            ids[json.loads(raw)["headers"]["id"]] += 1
    return ids


def labels(client: Any, queue: str) -> Counter[int]:
    """How many times each ``i`` sits in ``queue``."""
    found: Counter[int] = Counter()
    for raw in client.lrange(queue, 0, -1):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        found[body[1]["kwargs"]["i"]] += 1
    return found


def _batches(app: Any) -> bool:
    """Does the package write this app's batches to Redis in chunks (kombu 5.7's
    ``create_publish_batch``), rather than one message per round trip?"""
    with app.connection_for_write() as connection:
        return bool(getattr(connection.default_channel, "create_publish_batch", None))


def relay_until_empty() -> int:
    """What ``manage.py deferred_signals relay`` does, in a process of its own (no cooldown
    carried over from the request that failed)."""
    total = 0
    for _ in range(10):
        publisher.cooldown.clear()
        total += Relay().run_once()
        if not OutboxCall.objects.exists():
            break
        time.sleep(0.1)
    return total


def report(what: str, committed: int, seen: Counter[Any], durations: list[float]) -> None:
    lost = committed - len(seen)
    twice = sum(1 for count in seen.values() if count > 1)
    print(
        f"\n{what}: committed {committed} / published {len(seen)} / lost {lost} / "
        f"published twice {twice}; slowest commit {max(durations):.2f} s"
    )


FAULTS = {
    "OOM": (oom, oom_over, ()),
    "READONLY": (read_only, read_only_over, ()),
    "MISCONF": (misconf, misconf_over, ("--enable-protected-configs", "yes")),
    "WRONGPASS": (wrong_password, wrong_password_over, ("--requirepass", "secret")),
}


#: What the log says, in Redis's words (redis-py drops the OOM and READONLY prefixes).
WORDS = {
    "OOM": "used memory > 'maxmemory'",
    "READONLY": "read only replica",
    "MISCONF": "MISCONF",
    "WRONGPASS": "invalid username-password pair",
}


def app_url(server: PrivateRedis) -> str:
    password = server.password
    return server.url.replace("//", f"//:{password}@") if password else server.url


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_write_redis_refuses_is_spilled_and_relayed_once(
    private_redis: Any,
    settings: SettingsWrapper,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    mode: str,
) -> None:
    """Redis answers the LPUSH with an error reply: not published, so spilled (or kept in the
    outbox), logged with Redis's own words; the relay leaves the rows while Redis still
    refuses, and publishes each once after."""
    start, end, arguments = FAULTS[fault]
    server = private_redis(*arguments)
    queue = f"ds-replies-{uuid.uuid4().hex[:8]}"
    app = make_app("private-redis", app_url(server))
    durations = []
    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": TIMEOUT,
            "DELIVERY": mode,
        }
        durations.append(commit("before", 0))  # a live connection when the fault starts
        assert server.client.llen(queue) == 1
        server.client.delete(queue)
        start(server)
        with caplog.at_level(logging.WARNING, logger="deferred_signals"):
            durations += [commit(fault, i) for i in range(20)]
        assert OutboxCall.objects.count() == 20, "every refused call is in the outbox"
        fate = "spilled" if mode == "on_commit" else "kept in the outbox"
        assert WORDS[fault] in caplog.text and f"{fate}: tests.user_event" in caplog.text

        publisher.cooldown.clear()
        assert Relay().run_once() == 0, "the relay counts nothing Redis refused"
        assert OutboxCall.objects.count() == 20, "and deletes no row of it"
        end(server)
        relay_until_empty()
        seen = labels(server.client, queue)
    report(f"Redis {fault} ({mode})", 20, seen, durations)
    assert seen == Counter(range(20)), "each committed call published exactly once"
    assert not OutboxCall.objects.exists()
    assert max(durations) < TIMEOUT + 0.5


@pytest.mark.parametrize("prefix", ["", "dsprefix:"])
@pytest.mark.parametrize("mode", MODES)
def test_a_batch_redis_would_take_in_part_is_refused_whole_and_published_once(
    private_redis: Any, settings: SettingsWrapper, mode: str, prefix: str
) -> None:
    """Memory short, Redis refuses the long ``LPUSH`` of a batch (20 calls of 20 KB to one
    queue: the batch itself, in its input buffer, is over ``maxmemory``) and would take the
    short one after it (one call to another queue). The batch is spilled whole, so none of it
    may be in Redis: the relay publishes it, each call once. The relay, under the same
    shortage, publishes nothing and keeps every row."""
    server = private_redis()
    queue, other = (f"ds-replies-{uuid.uuid4().hex[:8]}" for _ in range(2))
    app = make_app("private-redis", server.url)
    if prefix:  # kombu's global_keyprefix: written through the channel's client
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": TIMEOUT,
            "DELIVERY": mode,
            "HANDLERS": {OTHER: {"queue": other}},
        }
        commit("before", 0)  # connected, both queues declared
        with transaction.atomic():
            slow_signal.send(sender=None, i=0)
        server.client.delete(prefix + queue, prefix + other)
        server.client.config_set("maxmemory-policy", "noeviction")
        used = server.client.info("memory")["used_memory"]
        short = used + 100_000  # short of 20 calls of 20 KB

        server.client.config_set("maxmemory", short)
        started = time.monotonic()
        with transaction.atomic():
            for i in range(20):
                user_registered.send(sender=None, label="part", i=i, pad="x" * 20_000)
            slow_signal.send(sender=None, i=20)
        took = time.monotonic() - started
        in_redis = labels(server.client, prefix + queue) + labels(server.client, prefix + other)
        kept = OutboxCall.objects.count()
        assert kept + sum(in_redis.values()) == 21, "a call in Redis must not be in the outbox"
        if _batches(app):
            # One chunk: refused whole, it must have left nothing in Redis.
            assert kept == 21
            assert not in_redis, "a batch counted as refused must have left nothing in Redis"
        # else kombu < 5.7 (no create_publish_batch): one message per round trip, each taken
        # or refused on its own (the first, before memory ran short, is taken).

        publisher.cooldown.clear()
        assert Relay().run_once() == 0
        assert OutboxCall.objects.count() == kept
        after = labels(server.client, prefix + queue) + labels(server.client, prefix + other)
        assert after == in_redis, "a relay round counted as refused must have left nothing"

        server.client.config_set("maxmemory", 0)
        relay_until_empty()
        seen = labels(server.client, prefix + queue) + labels(server.client, prefix + other)
    report(f"Redis OOM in the middle of a batch ({mode}, {prefix=})", 21, seen, [took])
    assert seen == Counter(range(21)), "each committed call published exactly once"


@pytest.mark.parametrize("prefix", ["", "dsprefix:"])
@pytest.mark.parametrize("mode", MODES)
def test_a_queue_key_of_another_type_refuses_only_its_own_calls(
    private_redis: Any, settings: SettingsWrapper, mode: str, prefix: str
) -> None:
    """The key of one queue holds a string: its ``LPUSH`` fails as it runs (``WRONGTYPE``),
    and Redis runs the other ``LPUSH`` commands of the ``MULTI``/``EXEC`` all the same. Those
    calls are published, not spilled (they would be published twice); only the refused one
    goes to the outbox, without a cooldown: a commit to a good queue right after publishes
    at once. The relay keeps the refused row (an attempt of its own) while the key is wrong,
    and publishes it once after."""
    server = private_redis()
    queue, other = (f"ds-replies-{uuid.uuid4().hex[:8]}" for _ in range(2))
    app = make_app("private-redis", server.url)
    if prefix:  # kombu's global_keyprefix: written through the channel's client
        app.conf.broker_transport_options = {"global_keyprefix": prefix}

    def seen() -> Counter[int]:
        return labels(server.client, prefix + queue) + labels(server.client, prefix + other)

    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": TIMEOUT,
            "DELIVERY": mode,
            "HANDLERS": {OTHER: {"queue": other}},
        }
        commit("before", 100)  # connected, both queues declared
        with transaction.atomic():
            slow_signal.send(sender=None, i=101)
        server.client.delete(prefix + queue, prefix + other)
        server.client.set(prefix + other, "not a list")

        with transaction.atomic():  # three runs: queue, other (refused), queue
            for i in range(3):
                user_registered.send(sender=None, label="typed", i=i)
            slow_signal.send(sender=None, i=3)
            for i in (4, 5):
                user_registered.send(sender=None, label="typed", i=i)
        assert labels(server.client, prefix + queue) == Counter([0, 1, 2, 4, 5])
        assert list(OutboxCall.objects.values_list("handler", flat=True)) == [OTHER]
        assert not publisher.cooldown.active(), "a refused list is no outage"

        with transaction.atomic():  # one run, to the wrong list alone: refused, no cooldown
            slow_signal.send(sender=None, i=6)
        commit("typed", 7)
        assert labels(server.client, prefix + queue)[7] == 1, "published at once"
        assert OutboxCall.objects.count() == 2

        assert Relay().run_once() == 0, "the relay counts nothing Redis refused"
        assert OutboxCall.objects.count() == 2
        assert set(OutboxCall.objects.values_list("attempts", flat=True)) <= {0, 1}
        assert sum(OutboxCall.objects.values_list("attempts", flat=True)) >= 1, (
            "a refusal counts an attempt of its row (a dead letter in the end, not a loop)"
        )
        assert labels(server.client, prefix + queue) == Counter([0, 1, 2, 4, 5, 7]), (
            "nothing published twice meanwhile"
        )

        server.client.delete(prefix + other)
        OutboxCall.objects.update(next_attempt_at=timezone.now())  # no backoff to wait
        relay_until_empty()
        found = seen()
    report(f"Redis WRONGTYPE in a batch ({mode}, {prefix=})", 8, found, [0.0])
    assert found == Counter(range(8)), "each committed call published exactly once"


@pytest.mark.parametrize("prefix", ["", "dsprefix:"])
@pytest.mark.parametrize("mode", MODES)
def test_a_chunk_written_in_part_by_kombu_counts_what_the_push_wrote(
    private_redis: Any, settings: SettingsWrapper, mode: str, prefix: str
) -> None:
    """One chunk, two writers: the calls the push writes (plain JSON) and one it leaves to
    kombu's pipeline (compressed by a route), whose list holds a string (``WRONGTYPE``).
    Whichever writes first, what Redis took counts as published and is not in the outbox
    (it would be published twice); the refused call is kept and relayed once."""
    server = private_redis()
    queue, other = (f"ds-replies-{uuid.uuid4().hex[:8]}" for _ in range(2))
    app = make_app("private-redis", server.url)
    app.conf.task_routes = {OTHER: {"compression": "zlib"}}  # not a shape the push writes
    if prefix:
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": TIMEOUT,
            "DELIVERY": mode,
            "HANDLERS": {OTHER: {"queue": other}},
        }
        commit("before", 100)  # connected, both queues declared
        with transaction.atomic():
            slow_signal.send(sender=None, i=101)
        server.client.delete(prefix + queue, prefix + other)
        server.client.set(prefix + other, "not a list")

        with transaction.atomic():
            for i in range(3):
                user_registered.send(sender=None, label="mixed", i=i)
            slow_signal.send(sender=None, i=3)
        in_redis = labels(server.client, prefix + queue)
        kept = list(OutboxCall.objects.values_list("handler", flat=True))
        assert not publisher.cooldown.active(), "a refused list is no outage"
        assert in_redis == Counter([0, 1, 2]), "the push's calls are in Redis, once"
        assert kept == [OTHER], "a call Redis took must not be in the outbox too"

        server.client.delete(prefix + other)
        OutboxCall.objects.update(next_attempt_at=timezone.now())
        relay_until_empty()
        assert labels(server.client, prefix + queue) == Counter([0, 1, 2])
        assert server.client.llen(prefix + other) == 1
    assert not OutboxCall.objects.exists()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ["one queue", "two queues"])
def test_writes_paused_hold_a_commit_no_longer_than_publish_timeout_and_double_nothing(
    private_redis: Any, settings: SettingsWrapper, mode: str, shape: str
) -> None:
    """``CLIENT PAUSE ... WRITE``: Redis reads a publish and holds it, unanswered, until the
    pause ends. The commit gives up at ``PUBLISH_TIMEOUT`` and spills; closing the connection
    withdraws the held write (Redis drops a paused client's commands when it leaves), so the
    relay's copy is the only one."""
    timeout, pause = 0.5, 1.5
    server = private_redis()
    queue, other = (f"ds-replies-{uuid.uuid4().hex[:8]}" for _ in range(2))
    app = make_app("private-redis", server.url)
    durations = []
    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": timeout,
            "DELIVERY": mode,
            "HANDLERS": {OTHER: {"queue": other}},
        }
        commit("before", 0)  # connected, both queues declared
        with transaction.atomic():
            slow_signal.send(sender=None, i=0)
        server.client.delete(queue, other)
        server.client.execute_command("CLIENT", "PAUSE", int(pause * 1000), "WRITE")
        paused_until = time.monotonic() + pause
        for i in range(0, 10, 2):
            started = time.monotonic()
            with transaction.atomic():
                user_registered.send(sender=None, label="paused", i=i)
                if shape == "two queues":  # a chunk of two runs: MULTI/EXEC
                    slow_signal.send(sender=None, i=i + 1)
                else:
                    user_registered.send(sender=None, label="paused", i=i + 1)
            durations.append(time.monotonic() - started)
        committed = 10
        assert OutboxCall.objects.count() == committed
        time.sleep(max(0.0, paused_until - time.monotonic()) + 0.3)  # the pause is over
        in_redis = labels(server.client, queue) + labels(server.client, other)
        relay_until_empty()
        seen = labels(server.client, queue) + labels(server.client, other)
    report(f"Redis writes paused {pause} s ({shape}, {mode})", committed, seen, durations)
    print(f"  held writes Redis ran after the pause: {sum(in_redis.values())}")
    assert max(durations) < timeout + 0.5
    assert not in_redis, "a write given up on must not run when the pause ends"
    assert seen == Counter(range(committed))


# --- RabbitMQ: a queue an operator's policy keeps short ---------------------------------------


@pytest.fixture
def rabbit_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this test's own, where queues named ``ds-full-*`` hold 3 messages
    and refuse more (a policy, as an operator sets one: the package declares no argument).
    Its URL; the vhost is deleted after."""
    require("rabbitmq")
    if shutil.which("rabbitmqctl") is None:
        missing("no rabbitmqctl here (the RabbitMQ server's tools, run as root)")
    vhost = f"ds-tests-{uuid.uuid4().hex[:8]}"

    def ctl(*arguments: str) -> None:
        done = subprocess.run(["rabbitmqctl", "-q", *arguments], capture_output=True, timeout=60)
        if done.returncode:
            missing(f"rabbitmqctl {arguments[0]} failed (needs root): {done.stderr[-300:]!r}")

    ctl("add_vhost", vhost)
    try:
        ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        policy = json.dumps({"max-length": 3, "overflow": "reject-publish"})
        ctl("set_policy", "-p", vhost, "--apply-to", "queues", "full", "^ds-full-", policy)
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        ctl("delete_vhost", vhost)


def take_all(url: str, queue: str) -> list[int]:
    """The ``i`` of each message in ``queue``, taken off it."""
    from kombu import Connection
    from kombu import Queue as KombuQueue
    from kombu.exceptions import ChannelError

    found = []
    with Connection(url) as connection:
        bound = KombuQueue(queue, channel=connection.channel())
        try:
            while (message := bound.get(no_ack=True)) is not None:
                found.append(json.loads(message.body)[1]["kwargs"]["i"])
        except ChannelError:  # no such queue (404): nothing in it
            pass
    return found


@pytest.mark.parametrize("mode", MODES)
def test_a_queue_full_by_policy_refuses_calls_that_are_spilled_and_relayed_once(
    rabbit_vhost: str, settings: SettingsWrapper, mode: str
) -> None:
    """RabbitMQ nacks what a full queue (``overflow: reject-publish``) cannot take: those
    calls are spilled, never counted as published; the relay keeps them while the queue is
    full and publishes each once as the queue drains."""
    queue = f"ds-full-{uuid.uuid4().hex[:8]}"
    app = make_app("full-queue", rabbit_vhost)
    durations = []
    taken: list[int] = []
    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": TIMEOUT,
            "DELIVERY": mode,
        }
        durations += [commit("full", i) for i in range(5)]  # one call per commit
        with transaction.atomic():  # and a batch of five
            for i in range(5, 10):
                user_registered.send(sender=None, label="full", i=i)
        assert OutboxCall.objects.count() == 7, "3 calls fill the queue, 7 are refused"

        publisher.cooldown.clear()
        assert Relay().run_once() == 0, "nothing the full queue refused counts"
        assert OutboxCall.objects.count() == 7

        for _ in range(10):  # a consumer drains the queue, the relay fills it again
            taken += take_all(rabbit_vhost, queue)
            if not OutboxCall.objects.exists():
                break
            OutboxCall.objects.update(next_attempt_at=timezone.now())  # no backoff to wait
            publisher.cooldown.clear()
            Relay().run_once()
        taken += take_all(rabbit_vhost, queue)
    seen = Counter(taken)
    report(f"RabbitMQ queue full by policy ({mode})", 10, seen, durations)
    assert seen == Counter(range(10))
    assert not OutboxCall.objects.exists()
    assert max(durations) < TIMEOUT + 0.5


@pytest.mark.parametrize("mode", MODES)
def test_a_queue_deleted_under_a_live_connection_loses_nothing(
    rabbit_vhost: str, settings: SettingsWrapper, mode: str
) -> None:
    """The queue is deleted (an operator, ``x-expires``) after this process's connection
    declared it: RabbitMQ acks a message it can route nowhere, and drops it. Such a call is
    refused, not published: it is spilled, and the relay (on a new connection, which declares
    the queue again) publishes it. In a batch, the calls before and after it go on."""
    from kombu import Connection

    queue, other = f"ds-gone-{uuid.uuid4().hex[:8]}", f"ds-other-{uuid.uuid4().hex[:8]}"
    app = make_app("deleted-queue", rabbit_vhost)

    def delete_queue() -> None:
        with Connection(rabbit_vhost) as connection:
            connection.channel().queue_delete(queue)

    durations = []
    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": TIMEOUT,
            "DELIVERY": mode,
            "HANDLERS": {OTHER: {"queue": other}},
        }
        durations.append(commit("gone", 0))  # connected, the queue declared
        take_all(rabbit_vhost, queue)
        delete_queue()
        durations += [commit("gone", i) for i in range(1, 6)]
        kept = OutboxCall.objects.count()
        relay_until_empty()
        taken = take_all(rabbit_vhost, queue)

        delete_queue()
        started = time.monotonic()
        with transaction.atomic():  # the queue of the second call is gone
            slow_signal.send(sender=None, i=6)
            user_registered.send(sender=None, label="gone", i=7)
        durations.append(time.monotonic() - started)
        kept += OutboxCall.objects.count()
        relay_until_empty()
        taken += take_all(rabbit_vhost, queue) + take_all(rabbit_vhost, other)
    seen = Counter(taken)
    report(f"RabbitMQ queue deleted under a live producer ({mode})", 7, seen, durations)
    print(f"  calls refused as unroutable, spilled or kept: {kept}")
    assert kept == 2, "the first call to the deleted queue, each time"
    assert seen == Counter(range(1, 8)), "each call published once, none dropped"
    assert max(durations) < TIMEOUT + 0.5


@pytest.mark.parametrize("mode", MODES)
def test_calls_after_a_refused_one_in_a_batch_are_published_once(
    rabbit_vhost: str, settings: SettingsWrapper, mode: str
) -> None:
    """A batch whose middle call goes to a full queue: RabbitMQ nacks it and acks the calls
    before and after it (other queues). The acked ones count, whatever their place: only the
    refused call is spilled, and none is published twice. The same in a relay round: the
    rows of the calls taken are deleted, the refused ones kept."""
    full, other = f"ds-full-{uuid.uuid4().hex[:8]}", f"ds-other-{uuid.uuid4().hex[:8]}"
    app = make_app("refused-in-a-batch", rabbit_vhost)
    with use_app(app, settings, other):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": TIMEOUT,
            "DELIVERY": mode,
            "HANDLERS": {OTHER: {"queue": full}},
        }
        with transaction.atomic():  # fills the full queue
            for i in range(3):
                slow_signal.send(sender=None, i=100 + i)
        assert not OutboxCall.objects.exists()
        started = time.monotonic()
        with transaction.atomic():
            for i in range(0, 12, 3):
                user_registered.send(sender=None, label="batch", i=i)
                slow_signal.send(sender=None, i=i + 1)  # refused: the queue is full
                user_registered.send(sender=None, label="batch", i=i + 2)
        took = time.monotonic() - started
        kept = sorted(json.loads(row.body)["kwargs"]["i"] for row in OutboxCall.objects.all())

        # The relay, the queue still full: rows of both handlers, interleaved, in one round.
        at = timezone.now() - datetime.timedelta(minutes=1)
        OutboxCall.objects.update(next_attempt_at=at + datetime.timedelta(minutes=1))
        for n, handler in enumerate(["tests.user_event", OTHER] * 3):
            OutboxCall.objects.create(
                id=str(uuid.uuid4()),
                handler=handler,
                body=body_text({"v": 1, "signal": 0, "sender": None, "kwargs": {"i": 12 + n}}),
                next_attempt_at=at + datetime.timedelta(seconds=n),
            )
        publisher.cooldown.clear()
        assert Relay().run_once() == 3, "the relay counts the calls the broker took"
        left = sorted(json.loads(row.body)["kwargs"]["i"] for row in OutboxCall.objects.all())
        assert left == [1, 4, 7, 10, 13, 15, 17], "and deletes their rows, only theirs"

        taken = [i for i in take_all(rabbit_vhost, full) if i < 100]  # the queue drains
        publisher.cooldown.clear()
        for _ in range(10):
            OutboxCall.objects.update(next_attempt_at=timezone.now())
            Relay().run_once()
            taken += take_all(rabbit_vhost, full)
            if not OutboxCall.objects.exists():
                break
        taken += take_all(rabbit_vhost, other)
    seen = Counter(taken)
    report(f"RabbitMQ nacks the middle of batches ({mode})", 18, seen, [took])
    print(f"  calls spilled or kept at commit: {kept}")
    assert kept == [1, 4, 7, 10], "the refused calls, and only them"
    assert seen == Counter(range(18))


@pytest.mark.parametrize("mode", MODES)
def test_a_big_batch_to_a_deleted_queue_costs_what_a_batch_costs(
    rabbit_vhost: str, settings: SettingsWrapper, mode: str
) -> None:
    """Every message of a batch to a deleted queue is returned, each in a frame of its own:
    handling each return must not cost a pass over the whole batch (quadratic: seconds for a
    few thousand calls, then ``PUBLISH_TIMEOUT``). The first call is spilled, the others
    published on a new connection, which declares the queue again: each once."""
    from kombu import Connection

    queue, n = f"ds-gone-{uuid.uuid4().hex[:8]}", 2000
    app = make_app("deleted-queue-batch", rabbit_vhost)

    def batch(label: str) -> float:
        started = time.monotonic()
        with transaction.atomic():
            for i in range(n):
                user_registered.send(sender=None, label=label, i=i)
        return time.monotonic() - started

    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": 10.0,  # time enough for the quadratic one: measured, not cut
            "DELIVERY": mode,
        }
        batch("live")  # connected, the queue declared; warm
        usual = batch("live")
        take_all(rabbit_vhost, queue)
        with Connection(rabbit_vhost) as connection:
            connection.channel().queue_delete(queue)
        took = batch("gone")
        kept = OutboxCall.objects.count()
        relay_until_empty()
        seen = Counter(take_all(rabbit_vhost, queue))
    report(f"RabbitMQ batch of {n} to a deleted queue ({mode})", n, seen, [took])
    print(f"  the same batch to a live queue: {usual:.2f} s")
    assert kept == 1, "the first call, refused; the others published again at once"
    assert seen == Counter(range(n))
    assert took < 3 * usual + 0.5, "returned once, published once more: not quadratic"


class SilentAfterNack:
    """A loopback proxy to RabbitMQ that, once it has passed on a ``basic.nack``, drops every
    ``basic.ack`` (the broker refused one call, then stopped answering) until ``heal()``."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.silent = False
        self.healed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        return url.replace(":5672/", f":{self.port}/")

    def heal(self) -> None:
        self.silent, self.healed = False, True

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", 5672))
                threading.Thread(target=self._up, args=(client, server), daemon=True).start()
                threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, source: socket.socket, target: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)

    def _down(self, source: socket.socket, target: socket.socket) -> None:
        buffer = b""
        with suppress(OSError):
            while data := source.recv(65536):
                buffer += data
                while len(buffer) >= 7:  # AMQP frames: type, channel, size, payload, 0xCE
                    kind, _, size = struct.unpack(">BHI", buffer[:7])
                    if len(buffer) < 8 + size:
                        break
                    frame, buffer = buffer[: 8 + size], buffer[8 + size :]
                    method = struct.unpack(">HH", frame[7:11]) if kind == 1 else None
                    if method == (60, 120) and not self.healed:  # basic.nack
                        self.silent = True
                    elif method == (60, 80) and self.silent:  # basic.ack
                        continue
                    target.sendall(frame)


@pytest.mark.parametrize("mode", MODES)
def test_a_broker_silent_after_a_refusal_holds_a_commit_no_longer_than_publish_timeout(
    rabbit_vhost: str, settings: SettingsWrapper, mode: str
) -> None:
    """RabbitMQ nacks the first call of a batch (its queue full), then confirms nothing more.
    The commit waits for the other calls' confirms until ``PUBLISH_TIMEOUT``, then spills
    them with the refused one: it does not try them again on a new connection (a second
    ``PUBLISH_TIMEOUT``). The relay publishes each once the broker answers again."""
    full, other = f"ds-full-{uuid.uuid4().hex[:8]}", f"ds-other-{uuid.uuid4().hex[:8]}"
    proxy = SilentAfterNack()
    app = make_app("silent-after-nack", proxy.url(rabbit_vhost))
    try:
        with use_app(app, settings, other):
            settings.DEFERRED_SIGNALS = {
                **settings.DEFERRED_SIGNALS,
                "PUBLISH_TIMEOUT": 1.0,
                "DELIVERY": mode,
                "HANDLERS": {OTHER: {"queue": full}},
            }
            with transaction.atomic():  # fills the full queue
                for i in range(3):
                    slow_signal.send(sender=None, i=100 + i)
            assert not OutboxCall.objects.exists()
            started = time.monotonic()
            with transaction.atomic():
                slow_signal.send(sender=None, i=0)  # refused: the queue is full
                for i in range(1, 4):
                    user_registered.send(sender=None, label="silent", i=i)
            took = time.monotonic() - started
            kept = OutboxCall.objects.count()

            proxy.heal()
            taken = [i for i in take_all(rabbit_vhost, full) if i < 100]
            relay_until_empty()
            taken += take_all(rabbit_vhost, full) + take_all(rabbit_vhost, other)
    finally:
        proxy.close()
    seen = Counter(taken)
    report(f"RabbitMQ silent after a nack ({mode})", 4, seen, [took])
    assert took < 1.0 + 0.5, "one PUBLISH_TIMEOUT, not one per try"
    assert kept == 4, "the refused call and the unconfirmed ones"
    assert set(seen) == set(range(4)), "none lost (the unconfirmed ones may run twice)"


@pytest.mark.parametrize("mode", MODES)
def test_a_busy_redis_holds_a_commit_no_longer_than_publish_timeout(
    private_redis: Any, settings: SettingsWrapper, mode: str
) -> None:
    """Redis busy with one slow command (``DEBUG SLEEP``: a long script, a big ``DEL``) reads
    nothing else meanwhile. The commit gives up at ``PUBLISH_TIMEOUT`` and spills. Redis runs
    the write it was sent once it wakes (closing the socket, even with a reset, does not
    withdraw bytes Redis has not read yet): that call is published twice, under one call id,
    which ``idempotent=True`` skips the second time. At least once, as documented."""
    timeout, busy = 0.5, 1.5
    server = private_redis("--enable-debug-command", "yes")
    queue = f"ds-replies-{uuid.uuid4().hex[:8]}"
    app = make_app("private-redis", server.url)
    durations = []
    with use_app(app, settings, queue):
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS,
            "PUBLISH_TIMEOUT": timeout,
            "DELIVERY": mode,
        }
        commit("before", 0)  # connected, the queue declared
        server.client.delete(queue)
        import redis

        sleeper = redis.Redis(port=server.port)
        thread = threading.Thread(target=sleeper.execute_command, args=("DEBUG", "SLEEP", busy))
        thread.start()
        time.sleep(0.1)  # Redis is asleep
        durations += [commit("busy", i) for i in range(5)]
        thread.join()
        time.sleep(0.2)
        in_redis = labels(server.client, queue)
        relay_until_empty()
        seen = labels(server.client, queue)
        ids = published(server.client, queue)
    report(f"Redis busy {busy} s ({mode})", 5, seen, durations)
    print(f"  writes given up on that Redis ran when it woke: {sum(in_redis.values())}")
    assert max(durations) < timeout + 0.5
    assert set(seen) == set(range(5)), "none lost"
    assert len(ids) == 5, "a call published twice has one id: idempotent=True skips it"
    assert sum(in_redis.values()) <= 1, "only the write in flight at the timeout"


class SlowReplies:
    """A loopback proxy to RabbitMQ that holds each frame from the broker for ``delay``
    seconds (a slow link, frames still pipelined). ``later``: the delay of connections
    opened from now on; ``None`` there: they get no answer at all (a broker that hangs)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.links: list[dict[str, float | None]] = []
        self.later: float | None = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        return url.replace(":5672/", f":{self.port}/")

    def slow(self, delay: float, later: float | None) -> None:
        for link in self.links:
            link["delay"] = delay
        self.later = later

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", 5672))
                link = {"delay": self.later}
                self.links.append(link)
                threading.Thread(target=self._up, args=(client, server), daemon=True).start()
                threading.Thread(
                    target=self._down, args=(server, client, link), daemon=True
                ).start()

    def _up(self, source: socket.socket, target: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)

    def _down(self, source: socket.socket, target: socket.socket, link: dict[str, Any]) -> None:
        held: Queue[tuple[float, bytes]] = Queue()

        def send() -> None:
            with suppress(OSError):
                while True:
                    due, data = held.get()
                    time.sleep(max(0.0, due - time.monotonic()))
                    target.sendall(data)

        threading.Thread(target=send, daemon=True).start()
        with suppress(OSError):
            while data := source.recv(65536):
                if link["delay"] is not None:
                    held.put((time.monotonic() + link["delay"], data))


PUBLISH_TIMEOUT_HERE = 1.0


def _refused_then_slow(
    rabbit_vhost: str,
    settings: SettingsWrapper,
    mode: str,
    label: str,
    delay: float,
    later: float | None,
) -> tuple[float, int, bool, Counter[int]]:
    """Commit four calls to a queue deleted after it was declared, behind a proxy that
    delays the broker's frames by ``delay`` (``later`` on connections opened afterwards; None:
    no answer at all). Returns the commit's time, the calls spilled or kept at commit, whether
    the cooldown started, and how often the relay then published each call."""
    from kombu import Connection

    queue_name = f"ds-gone-{uuid.uuid4().hex[:8]}"
    proxy = SlowReplies()
    app = make_app(f"{label}-replies", proxy.url(rabbit_vhost))
    try:
        with use_app(app, settings, queue_name):
            settings.DEFERRED_SIGNALS = {
                **settings.DEFERRED_SIGNALS,
                "PUBLISH_TIMEOUT": PUBLISH_TIMEOUT_HERE,
                "DELIVERY": mode,
            }
            commit(label, 100)  # connected, the queue declared
            taken = [i for i in take_all(rabbit_vhost, queue_name) if i < 100]
            with Connection(rabbit_vhost) as connection:
                connection.channel().queue_delete(queue_name)
            proxy.slow(delay, later=later)
            started = time.monotonic()
            with transaction.atomic():
                for i in range(4):
                    user_registered.send(sender=None, label=label, i=i)
            took = time.monotonic() - started
            kept = OutboxCall.objects.count()
            cooling = publisher.cooldown.active()

            proxy.slow(0.0, later=0.0)
            relay_until_empty()
            taken += take_all(rabbit_vhost, queue_name)
    finally:
        proxy.close()
    return took, kept, cooling, Counter(taken)


@pytest.mark.parametrize("mode", MODES)
def test_a_refusal_late_in_publish_timeout_leaves_no_second_publish_timeout(
    rabbit_vhost: str, settings: SettingsWrapper, mode: str
) -> None:
    """The broker is slow: the returns of a batch to a deleted queue arrive at 0.8 x
    ``PUBLISH_TIMEOUT``, and publishing the calls after the refused one on a new connection
    would take another 0.7 x. The commit's attempts share one ``PUBLISH_TIMEOUT``: it spills
    them when it runs out, without starting a cooldown (the broker answered). None lost,
    each published once by the relay."""
    timeout = PUBLISH_TIMEOUT_HERE
    took, kept, cooling, seen = _refused_then_slow(
        rabbit_vhost, settings, mode, "slow", 0.8 * timeout, later=0.1 * timeout
    )
    report(f"RabbitMQ slow, a refusal at 0.8 x PUBLISH_TIMEOUT ({mode})", 4, seen, [took])
    print(f"  calls spilled or kept at commit: {kept}")
    assert took < timeout + 0.3, "one PUBLISH_TIMEOUT for the commit, not one per attempt"
    assert not cooling, "the broker answered: running out of a shared budget is no outage"
    assert kept == 4, "the refused call, and the others the time left could not publish"
    assert seen == Counter(range(4)), "none lost, none published twice"


@pytest.mark.parametrize("mode", MODES)
def test_a_broker_hanging_after_a_quick_refusal_starts_the_cooldown(
    rabbit_vhost: str, settings: SettingsWrapper, mode: str
) -> None:
    """The broker refuses the first call of a batch at once, then hangs: the new connection
    for the calls after it gets no answer. That attempt had nearly the whole
    ``PUBLISH_TIMEOUT``: a real timeout, which starts the cooldown; the commit still waits no
    longer than one ``PUBLISH_TIMEOUT``."""
    timeout = PUBLISH_TIMEOUT_HERE
    took, kept, cooling, seen = _refused_then_slow(
        rabbit_vhost, settings, mode, "hang", 0.0, later=None
    )
    report(f"RabbitMQ hanging after a quick refusal ({mode})", 4, seen, [took])
    assert took < timeout + 0.3
    assert cooling, "the broker did not answer a whole PUBLISH_TIMEOUT: an outage"
    assert kept == 4
    assert seen == Counter(range(4)), "none lost, none published twice"
