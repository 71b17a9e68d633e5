"""The relay and the commit path when one part fails: one queue, one database, one statement.

A failure of one part costs only what depends on it. A queue the broker refuses (RabbitMQ:
a queue declared with other arguments, a full queue that nacks) holds back only its own
calls, which count attempts and end as dead letters; a database that is down, read-only or
refuses the relay's DELETE is logged and tried again later while the others are relayed. All
against real RabbitMQ, Redis and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connections, transaction
from django.utils import timezone
from kombu import Connection, Exchange
from kombu import Queue as KombuQueue
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import publisher, relay
from deferred_signals.models import DeadLetter, OutboxCall
from deferred_signals.outbox import body_text
from deferred_signals.relay import Relay
from tests.conftest import Queue, require, use_app
from tests.faults import FaultProxy
from tests.testapp.signals import slow_signal, user_registered
from tests.workers import BROKERS, make_app

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

GOOD = "tests.user_event"  # user_registered: routed to the default queue
BAD = "tests.testapp.handlers.marker"  # slow_signal: routed to the refused queue


def body(**kwargs: Any) -> str:
    return body_text({"v": 1, "signal": 0, "sender": None, "kwargs": kwargs})


def add_rows(using: str = "default", *, bad: int = 1, good: int = 5) -> list[str]:
    """``bad`` rows of the refused handler, due first, then ``good`` rows; their ids."""
    start = timezone.now() - datetime.timedelta(minutes=1)
    ids = []
    for n, handler in enumerate([BAD] * bad + [GOOD] * good):
        id = f"{'bad' if handler == BAD else 'good'}-{n}-{uuid.uuid4().hex[:6]}"
        OutboxCall.objects.using(using).create(
            id=id,
            handler=handler,
            body=body(n=n),
            next_attempt_at=start + datetime.timedelta(seconds=n),
        )
        ids.append(id)
    return ids


def make_due(using: str = "default") -> None:
    OutboxCall.objects.using(using).update(next_attempt_at=timezone.now())


class Rabbit:
    """A RabbitMQ app of the tests, its default queue and a queue it refuses."""

    def __init__(self, good: str, bad: str) -> None:
        self.good, self.bad = good, bad
        self.url = BROKERS["rabbitmq"]

    def ids(self, name: str) -> list[str]:
        """The task ids of the messages in ``name`` (taken off the queue)."""
        found = []
        with Connection(self.url) as connection:
            queue = KombuQueue(name, channel=connection.channel())
            while (message := queue.get(no_ack=True)) is not None:
                found.append(message.headers["id"])
        return found


@pytest.fixture
def rabbit(settings: SettingsWrapper) -> Iterator[Rabbit]:
    require("rabbitmq")
    suffix = uuid.uuid4().hex[:8]
    rabbit = Rabbit(f"ds-refusal-good-{suffix}", f"ds-refusal-bad-{suffix}")
    app = make_app("refusal-tests", rabbit.url)
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "HANDLERS": {BAD: {"queue": rabbit.bad}},
        "RELAY_MAX_ATTEMPTS": 3,
    }
    with Connection(rabbit.url) as connection:
        KombuQueue(rabbit.good, channel=connection.channel()).declare()
    try:
        with use_app(app, settings, rabbit.good):
            yield rabbit
    finally:
        with Connection(rabbit.url) as connection:
            for name in (rabbit.good, rabbit.bad):
                with contextlib.suppress(Exception):  # already gone
                    KombuQueue(name, channel=connection.channel()).delete()


def refuse_by_arguments(rabbit: Rabbit) -> None:
    """The refused queue exists with arguments the package does not declare: every declare
    of it is refused with 406 PRECONDITION_FAILED (and its channel closed)."""
    with Connection(rabbit.url) as connection:
        queue = KombuQueue(rabbit.bad, queue_arguments={"x-max-priority": 10})
        queue(connection.channel()).declare()


def refuse_by_nack(rabbit: Rabbit, app_conf: Any) -> None:
    """The refused queue is full and rejects publishes: the broker nacks each message."""
    queue = KombuQueue(
        rabbit.bad,
        Exchange(rabbit.bad, type="direct"),
        rabbit.bad,
        queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    # Declared by the app with the same arguments: the publish itself is refused.
    app_conf.task_queues = [queue, KombuQueue(rabbit.good)]
    with Connection(rabbit.url) as connection:
        queue(connection.channel()).declare()


@pytest.mark.parametrize("refusal", ["declare", "nack"])
def test_a_queue_the_broker_refuses_holds_back_only_its_own_calls(
    rabbit: Rabbit, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    from celery import current_app

    if refusal == "declare":
        refuse_by_arguments(rabbit)
    else:
        refuse_by_nack(rabbit, current_app.conf)
    ids = add_rows(bad=1, good=5)
    bad_id, good_ids = ids[0], ids[1:]

    # The refused row is the oldest, first in every batch: the rows behind it go on.
    assert Relay(databases=["default"]).run_once() == 5
    assert sorted(set(rabbit.ids(rabbit.good))) == sorted(good_ids)
    assert not publisher.cooldown.active(), "a refusal is no outage"
    row = OutboxCall.objects.get()
    assert row.id == bad_id and row.attempts == 1
    assert ("PRECONDITION_FAILED" if refusal == "declare" else "refused") in row.last_error

    # It counts its attempts and ends as a dead letter (RELAY_MAX_ATTEMPTS=3).
    for _ in range(2):
        make_due()
        Relay(databases=["default"]).run_once()
    assert not OutboxCall.objects.exists()
    letter = DeadLetter.objects.get()
    assert (letter.call_id, letter.handler, letter.attempts) == (bad_id, BAD, 3)

    # At commit: the refused call goes to the outbox, the others to the broker, and the
    # next commit publishes at once (no cooldown spilling every handler's calls). A declare
    # is refused before the call's publish: the calls after it go on, on a new channel. A
    # nack comes after the publishes: the calls before it are confirmed.
    with transaction.atomic():
        if refusal == "declare":
            slow_signal.send(sender=None, n=1)
            user_registered.send(sender=None, n=2)
        else:
            user_registered.send(sender=None, n=2)
            slow_signal.send(sender=None, n=1)
    assert [row.handler for row in OutboxCall.objects.all()] == [BAD]
    assert not publisher.cooldown.active()
    with transaction.atomic():
        user_registered.send(sender=None, n=3)
    assert OutboxCall.objects.count() == 1
    assert len(rabbit.ids(rabbit.good)) == 2


def test_a_message_refused_after_its_publish_is_found_one_at_a_time(
    rabbit: Rabbit, settings: SettingsWrapper
) -> None:
    """RabbitMQ refuses a publish to a missing exchange by closing the channel later, without
    saying which message: the error surfaces at some later call's publish or at the wait for
    confirms. No call is blamed on that; the relay publishes the unconfirmed rows one at a
    time, each confirmed, and only the refused rows count attempts and end as dead letters."""
    from celery import current_app

    from deferred_signals import routing

    missing = f"{rabbit.bad}-no-such-exchange"
    current_app.conf.task_routes = {
        BAD: {"exchange": missing, "exchange_type": "direct", "routing_key": "x"}
    }
    routing.clear_cache()
    try:
        good = add_rows(bad=0, good=50)
        (bad_1,) = add_rows(bad=1, good=0)
        good += add_rows(bad=0, good=50)
        (bad_2,) = add_rows(bad=1, good=0)
        good += add_rows(bad=0, good=50)
        # Due in that order: the refused rows in the middle of the batch.
        start = timezone.now() - datetime.timedelta(minutes=5)
        for n, id in enumerate([*good[:50], bad_1, *good[50:100], bad_2, *good[100:]]):
            OutboxCall.objects.filter(id=id).update(
                next_attempt_at=start + datetime.timedelta(milliseconds=n)
            )
        delivered = []
        for _ in range(3):  # RELAY_MAX_ATTEMPTS=3
            Relay(databases=["default"]).run_once()
            delivered += rabbit.ids(rabbit.good)
            assert not publisher.cooldown.active(), "a refusal is no outage"
            make_due()
        assert set(delivered) == set(good), "every good call delivered (at least once)"
        letters = sorted(DeadLetter.objects.values_list("call_id", "handler", "attempts"))
        assert letters == sorted([(bad_1, BAD, 3), (bad_2, BAD, 3)])
        assert not OutboxCall.objects.exists()

        # At commit no call can be blamed either: the unconfirmed ones are spilled, none is
        # lost, and the relay sorts them out as above.
        with transaction.atomic():
            for n in range(20):
                user_registered.send(sender=None, n=n)
            slow_signal.send(sender=None, n=1)
            for n in range(20, 40):
                user_registered.send(sender=None, n=n)
        assert not publisher.cooldown.active()
        in_queue = rabbit.ids(rabbit.good)
        left = list(OutboxCall.objects.values_list("handler", flat=True))
        assert left.count(BAD) == 1 and len(in_queue) + left.count(GOOD) >= 40
    finally:
        current_app.conf.task_routes = None
        routing.clear_cache()


def test_a_relay_round_publishing_one_at_a_time_is_bounded_by_publish_timeout(
    settings: SettingsWrapper,
) -> None:
    """After a refusal that names no call, the relay publishes the rows one at a time. A
    broker that then stalls (a partition: the proxy holds every byte) must not hold the
    round, and its rows' locks, past one PUBLISH_TIMEOUT, however much of it went already
    (here to a slow ``before_task_publish`` receiver): the rows left wait for a later round,
    none lost, none counted as published."""
    import time

    from celery import current_app
    from celery.signals import before_task_publish

    from deferred_signals import routing

    require("rabbitmq")
    timeout = 1.0
    suffix = uuid.uuid4().hex[:8]
    good_queue, missing = f"ds-stall-{suffix}", f"ds-stall-{suffix}-no-such-exchange"
    with FaultProxy(5672) as proxy:
        app = make_app("relay-stall", proxy.url_for(BROKERS["rabbitmq"]))
        with use_app(app, settings, good_queue):
            settings.DEFERRED_SIGNALS = {
                **settings.DEFERRED_SIGNALS,
                "PUBLISH_TIMEOUT": timeout,
                "PUBLISH_COOLDOWN": 0,
            }
            current_app.conf.task_routes = {
                BAD: {"exchange": missing, "exchange_type": "direct", "routing_key": "x"}
            }
            routing.clear_cache()
            seen: list[str] = []

            def stall(headers: dict[str, Any], **kwargs: Any) -> None:
                again = headers["id"] in seen  # published one at a time, after the batch
                seen.append(headers["id"])
                if again and len(set(seen)) < len(seen) - 1:
                    proxy.hold()  # the second row sent alone: the broker stops answering
                elif again:
                    time.sleep(0.6 * timeout)  # the first: most of the round's time goes

            try:
                ids = add_rows(bad=1, good=10)
                before_task_publish.connect(stall, weak=False)
                try:
                    started = time.monotonic()
                    published = Relay(databases=["default"]).run_once()
                    took = time.monotonic() - started
                finally:
                    before_task_publish.disconnect(stall)
                proxy.forward()
                print(f"\nrelay round with a stalled broker: {took:.2f} s, {published} published")
                assert len(set(seen)) < len(seen), "the rows were published one at a time"
                assert took < timeout + 0.4, "one PUBLISH_TIMEOUT for the round's publishing"
                left = set(OutboxCall.objects.values_list("id", flat=True))
                assert len(left) + published == len(ids) and ids[0] in left
            finally:
                current_app.conf.task_routes = None
                routing.clear_cache()
                with Connection(BROKERS["rabbitmq"]) as connection, contextlib.suppress(Exception):
                    KombuQueue(good_queue, channel=connection.channel()).delete()


def test_a_login_refused_is_an_outage(settings: SettingsWrapper) -> None:
    """403 at login says nothing of one call: it starts the cooldown, as any broker failure."""
    require("rabbitmq")
    url = BROKERS["rabbitmq"].replace("guest:guest@", "guest:not-the-password@")
    app = make_app("wrong-password", url)
    with use_app(app, settings, f"ds-login-{uuid.uuid4().hex[:8]}"):
        with transaction.atomic():
            user_registered.send(sender=None, n=1)
        assert publisher.cooldown.active()
        assert [row.handler for row in OutboxCall.objects.all()] == [GOOD]


# --- databases ----------------------------------------------------------------------------


@pytest.fixture
def other_through_proxy() -> Iterator[FaultProxy]:
    """The ``other`` database reached through a proxy the test can cut."""
    from tests.conftest import on_postgres

    if not on_postgres():
        pytest.skip("PostgreSQL-only: runs in make test's PostgreSQL pass")
    connection = connections["other"]
    port = connection.settings_dict["PORT"]
    with FaultProxy(int(port or 5432)) as proxy:
        connection.close()
        connection.settings_dict["PORT"] = proxy.port
        try:
            yield proxy
        finally:
            proxy.forward()
            connection.close()
            connection.settings_dict["PORT"] = port


@pytest.fixture
def quick_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "FAILURE_REST", (0.05, 0.1))


def test_a_database_down_at_start_is_relayed_once_it_answers(
    other_through_proxy: FaultProxy, redis_queue: Queue, quick_rest: None
) -> None:
    import time

    add_rows("default", bad=0, good=1)
    (waiting,) = add_rows("other", bad=0, good=1)
    other_through_proxy.refuse()
    connections["other"].close()
    started = Relay()
    assert started.databases == ["default"] and started.unverified == ["other"]
    assert started.run_once() == 1
    assert "other" in started.failures
    other_through_proxy.forward()
    time.sleep(0.15)
    assert started.run_once() == 1
    assert started.databases == ["default", "other"] and not started.unverified
    assert not started.failures
    assert waiting in {m["headers"]["id"] for m in redis_queue.messages()}
    assert not OutboxCall.objects.using("other").exists()


def test_a_database_failing_in_a_round_leaves_the_others_relayed(
    other_through_proxy: FaultProxy,
    redis_queue: Queue,
    quick_rest: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import time

    started = Relay()
    assert started.databases == ["default", "other"]
    (left,) = add_rows("other", bad=0, good=1)
    add_rows("default", bad=0, good=2)
    other_through_proxy.refuse()
    with caplog.at_level(logging.ERROR, "deferred_signals"):
        assert started.run_once() == 2  # no exception: the relay goes on
    assert "database 'other' failed" in caplog.text
    # The command's --once says so, for cron and CI.
    with pytest.raises(CommandError, match="database 'other'"):
        call_command("deferred_signals", "relay", "--once", "--database", "other")
    other_through_proxy.forward()
    time.sleep(0.15)
    assert started.run_once() == 1
    assert not started.failures
    assert left in {m["headers"]["id"] for m in redis_queue.messages()}


def test_the_health_file_is_not_touched_when_a_database_failed(
    other_through_proxy: FaultProxy, redis_queue: Queue, quick_rest: None, tmp_path: Path
) -> None:
    """A health file means healthy: neither ``relay --once`` nor a loop touches it after its
    database failed; once the database answers again, the next loop does."""
    import time

    health = tmp_path / "alive"
    add_rows("other", bad=0, good=1)
    other_through_proxy.refuse()
    with pytest.raises(CommandError, match="database 'other'"):
        call_command(
            "deferred_signals", "relay", "--once", "--database", "other",
            "--health-file", str(health),
        )  # fmt: skip
    assert not health.exists(), "relay --once touched the health file of a failed run"

    looping = Relay(databases=["other"], health_file=health)
    looping.run_once()
    looping.heartbeat()  # what each loop of ``relay`` does after its rounds
    assert "other" in looping.failures
    assert not health.exists(), "a loop whose database failed touched the health file"

    other_through_proxy.forward()
    time.sleep(0.15)  # the database's rest (quick_rest)
    assert looping.run_once() == 1
    looping.heartbeat()
    assert health.exists()


def test_a_read_only_database_is_not_relayed(
    other_through_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    connection = connections["other"]
    options = connection.settings_dict.setdefault("OPTIONS", {})
    options["options"] = "-c default_transaction_read_only=on"  # as a replica alias answers
    connection.close()
    try:
        with caplog.at_level(logging.WARNING, "deferred_signals"):
            started = Relay()
        assert started.databases == ["default"] and not started.unverified
        assert "database 'other' is read-only" in caplog.text
    finally:
        del options["options"]
        connection.close()


def test_a_refused_delete_rolls_the_round_back_instead_of_publishing_again_and_again(
    redis_queue: Queue, quick_rest: None
) -> None:
    from tests.conftest import on_postgres

    if not on_postgres():
        pytest.skip("PostgreSQL-only: runs in make test's PostgreSQL pass")
    import time

    table = OutboxCall._meta.db_table
    ids = add_rows("default", bad=0, good=3)
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION ds_refuse_delete() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'deletes refused'; END $$"
        )
        cursor.execute(
            f"CREATE TRIGGER ds_refuse_delete BEFORE DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION ds_refuse_delete()"
        )
    try:
        started = Relay(databases=["default"])
        assert started.run_once() == 0  # returns: the round rolled back, counted nothing
        assert "could not delete" in str(started.failures["default"])
        assert len(redis_queue) == 3, "each row published once, not in a loop"
        assert OutboxCall.objects.count() == 3
        assert OutboxCall.objects.filter(attempts=0).count() == 3
    finally:
        with connections["default"].cursor() as cursor:
            cursor.execute(f"DROP TRIGGER ds_refuse_delete ON {table}")
            cursor.execute("DROP FUNCTION ds_refuse_delete()")
    time.sleep(0.15)
    assert started.run_once() == 3  # published again (at-least-once), then deleted
    assert not OutboxCall.objects.exists()
    assert sorted({m["headers"]["id"] for m in redis_queue.messages()}) == sorted(ids)
