"""A publish at commit interrupted by an exception that is not an ``Exception``.

``KeyboardInterrupt``, ``SystemExit`` (a SIGTERM handler) and gevent's ``Timeout`` derive
from ``BaseException``: raised in the middle of the publish (by a ``before_task_publish``
receiver, by a signal arriving while the socket is written), they come after the ``COMMIT``.
The request side must not swallow them, but every call the broker did not confirm must be in
the outbox by the time they go on up: the broker may have some of them too (at least once),
none may be lost. Real transactions, a real Redis (a private one to pause), a real RabbitMQ.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
from celery.signals import before_task_publish
from django.db import transaction
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import sending
from deferred_signals.models import OutboxCall
from tests.conftest import Interrupted, Queue, require, use_app
from tests.private_redis import PrivateRedis
from tests.testapp.models import Author
from tests.testapp.signals import user_registered
from tests.workers import BROKERS, make_app

pytestmark = pytest.mark.django_db(transaction=True)

CALLS = 5


def delivery(settings: SettingsWrapper, mode: str) -> None:
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "DELIVERY": mode}


def interrupt_at(number: int, error: BaseException) -> Callable[..., None]:
    """A ``before_task_publish`` receiver raising ``error`` as the ``number``-th message goes."""
    seen: list[int] = []

    def receiver(**kwargs: Any) -> None:
        seen.append(1)
        if len(seen) == number:
            raise error

    return receiver


def commit_interrupted(error: type[BaseException]) -> None:
    """One transaction: a row and ``CALLS`` deferred calls; its commit raises ``error``."""
    with pytest.raises(error), transaction.atomic():
        Author.objects.create(name="interrupted")
        for i in range(CALLS):
            user_registered.send(sender=None, i=i)
    assert Author.objects.filter(name="interrupted").exists(), "committed"


def outbox_ids() -> set[str]:
    return set(OutboxCall.objects.values_list("id", flat=True))


@pytest.mark.parametrize("mode", ["on_commit", "outbox"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, Interrupted])
def test_an_interrupted_publish_on_redis_leaves_every_unconfirmed_call_in_the_outbox(
    redis_queue: Queue,
    settings: SettingsWrapper,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    call_ids: list[str],
    mode: str,
    error: type[BaseException],
) -> None:
    """Two chunks of two go out and are confirmed; the fifth message's receiver raises."""
    delivery(settings, mode)
    monkeypatch.setattr(sending, "BATCH_SIZE", 2)
    receiver = interrupt_at(5, error())
    before_task_publish.connect(receiver, weak=False)
    try:
        with caplog.at_level(logging.WARNING, logger="deferred_signals"):
            commit_interrupted(error)
    finally:
        before_task_publish.disconnect(receiver)
    in_broker = {message["headers"]["id"] for message in redis_queue.messages()}
    assert len(call_ids) == CALLS
    assert in_broker == set(call_ids[:4]), "the two confirmed chunks"
    assert outbox_ids() == set(call_ids[4:]), "the call interrupted, nothing lost"
    if mode == "on_commit":
        assert f"spilled: tests.user_event [{call_ids[4]}]" in caplog.text
        assert error.__name__ in caplog.text


def test_an_interruption_while_redis_holds_the_write_loses_no_call(
    private_redis: Callable[..., PrivateRedis],
    settings: SettingsWrapper,
    call_ids: list[str],
) -> None:
    """A signal arrives while the commit waits for Redis's reply (``CLIENT PAUSE WRITE``:
    Redis read the ``LPUSH`` and holds it), and its handler raises: the socket is closed with
    the write unanswered, and the whole batch is spilled. What Redis ran all the same is in
    both places, under one call id: at least once."""
    server = private_redis()
    queue = f"ds-interrupted-{uuid.uuid4().hex[:8]}"
    with use_app(make_app("interrupted", server.url), settings, queue):
        user_registered.send(sender=None, i=-1)  # connected, the queue declared
        before = set(call_ids)
        server.client.execute_command("CLIENT", "PAUSE", 2000, "WRITE")

        def interrupt(signum: int, frame: FrameType | None) -> None:
            raise Interrupted

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            commit_interrupted(Interrupted)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        server.client.execute_command("CLIENT", "UNPAUSE")
        time.sleep(0.2)
        in_broker = {json.loads(raw)["headers"]["id"] for raw in server.client.lrange(queue, 0, -1)}
    committed = set(call_ids) - before
    assert len(committed) == CALLS
    assert committed <= (in_broker | outbox_ids()), "each call in the broker or the outbox"
    assert outbox_ids() == committed, "none was confirmed: all spilled"


@pytest.fixture
def rabbit_queue(settings: SettingsWrapper) -> Iterator[str]:
    require("rabbitmq")
    queue = f"ds-interrupted-{uuid.uuid4().hex[:8]}"
    with use_app(make_app("interrupted-amqp", BROKERS["rabbitmq"]), settings, queue):
        yield queue
    from kombu import Connection

    with Connection(BROKERS["rabbitmq"]) as connection:
        connection.default_channel.queue_delete(queue)


def test_an_interrupted_publish_on_rabbitmq_leaves_every_unconfirmed_call_in_the_outbox(
    rabbit_queue: str, call_ids: list[str]
) -> None:
    """AMQP confirms are waited for after the whole batch: none of it was confirmed when the
    third message's receiver raised, so all of it is spilled (the first two reached the queue
    too: at least once)."""
    receiver = interrupt_at(3, KeyboardInterrupt())
    before_task_publish.connect(receiver, weak=False)
    try:
        commit_interrupted(KeyboardInterrupt)
    finally:
        before_task_publish.disconnect(receiver)
    from kombu import Connection
    from kombu import Queue as KombuQueue

    in_broker = set()
    with Connection(BROKERS["rabbitmq"]) as connection:
        bound = KombuQueue(rabbit_queue, channel=connection.channel())
        while (message := bound.get(no_ack=True)) is not None:
            in_broker.add(message.headers["id"])
    assert len(call_ids) == CALLS
    assert in_broker <= set(call_ids[:2]), "published before the interruption, at most"
    assert outbox_ids() == set(call_ids), "none confirmed: every call spilled"
