"""Third-party receivers of Celery's publish signals that raise, on Redis and RabbitMQ.

Celery's ``Signal.send`` catches a receiver's exception and logs it naming the receiver,
and ``apply_async`` publishes all the same. A call of ours must fare as well: published
once (neither spilled, which would publish it twice, nor dead-lettered by the relay), with
a log line naming the handler and the call id, on the commit's path and on the relay's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery.signals import after_task_publish, before_task_publish, task_sent
from django.db import transaction
from django.utils import timezone
from kombu import Connection
from kombu import Queue as KombuQueue
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals.models import DeadLetter, OutboxCall
from deferred_signals.outbox import body_text
from deferred_signals.relay import Relay
from tests.conftest import require, use_app
from tests.testapp.signals import user_registered
from tests.workers import BROKERS, make_app

pytestmark = pytest.mark.django_db(transaction=True)

HANDLER = "tests.user_event"  # user_registered's handler
SIGNALS = {"before": before_task_publish, "after": after_task_publish, "task_sent": task_sent}


def tracing_tool_broke(**kwargs: Any) -> None:
    raise RuntimeError("tracing tool broke")


def taken(broker: str, queue: str) -> list[str]:
    """The call ids of the messages in ``queue``, taken off it."""
    if broker == "redis":
        import redis

        client = redis.Redis.from_url(BROKERS["redis"])
        raw = client.lrange(queue, 0, -1)
        client.delete(queue)
        return [json.loads(item)["headers"]["id"] for item in raw]
    found = []
    with Connection(BROKERS["rabbitmq"]) as connection:
        bound = KombuQueue(queue, channel=connection.channel())
        while (message := bound.get(no_ack=True)) is not None:
            found.append(message.headers["id"])
    return found


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, settings: SettingsWrapper) -> Iterator[tuple[str, str]]:
    """The broker's name and a queue of this test's own, deferred calls routed to it."""
    require(request.param)
    queue = f"ds-receivers-{uuid.uuid4().hex[:8]}"
    app = make_app("raising-receivers", BROKERS[request.param])
    with use_app(app, settings, queue):
        yield request.param, queue
    if request.param == "redis":
        taken(request.param, queue)
    else:
        with Connection(BROKERS["rabbitmq"]) as connection, contextlib.suppress(Exception):
            KombuQueue(queue, channel=connection.channel()).delete()


@pytest.mark.parametrize("signal", list(SIGNALS))
def test_a_raising_publish_receiver_neither_spills_nor_doubles_a_call(
    broker: tuple[str, str], signal: str, caplog: pytest.LogCaptureFixture
) -> None:
    name, queue = broker
    SIGNALS[signal].connect(tracing_tool_broke, weak=False)
    try:
        with caplog.at_level(logging.WARNING, logger="deferred_signals"):
            with transaction.atomic():
                for i in range(3):
                    user_registered.send(sender=None, i=i)
            ids = taken(name, queue)
            assert len(ids) == 3 and len(set(ids)) == 3, "each call published once"
            assert not OutboxCall.objects.exists(), "nothing spilled: it would run twice"

            # The relay: published once, its row deleted, no attempt counted, no dead letter.
            row = OutboxCall.objects.create(
                id=f"relayed-{uuid.uuid4().hex[:6]}",
                handler=HANDLER,
                body=body_text({"v": 1, "signal": 0, "sender": None, "kwargs": {"i": 9}}),
                next_attempt_at=timezone.now(),
            )
            assert Relay(databases=["default"]).run_once() == 1
            assert taken(name, queue) == [row.id]
            assert not OutboxCall.objects.exists() and not DeadLetter.objects.exists()
    finally:
        SIGNALS[signal].disconnect(tracing_tool_broke)
    logged = [r.getMessage() for r in caplog.records if r.name == "deferred_signals"]
    for call_id in (*ids, row.id):
        (line,) = [text for text in logged if call_id in text and "raised" in text]
        assert HANDLER in line and "tracing_tool_broke" in line and "tracing tool broke" in line
        assert "published all the same" in line


def test_the_messages_a_raising_receiver_saw_are_the_ones_published(
    broker: tuple[str, str],
) -> None:
    """A ``before_task_publish`` receiver that changed the headers, then raised: the message
    goes out as it left them, as with ``apply_async``."""
    name, queue = broker

    def half_done(headers: dict[str, Any], **kwargs: Any) -> None:
        headers["x-traced"] = "yes"
        raise RuntimeError("after the header")

    before_task_publish.connect(half_done, weak=False)
    try:
        with transaction.atomic():
            user_registered.send(sender=None, i=1)
    finally:
        before_task_publish.disconnect(half_done)
    if name == "redis":
        import redis

        (raw,) = redis.Redis.from_url(BROKERS["redis"]).lrange(queue, 0, -1)
        message = json.loads(raw)
        assert message["headers"]["x-traced"] == "yes"
        body = json.loads(base64.b64decode(message["body"]))
        assert body[1]["kwargs"]["i"] == 1
    else:
        assert len(taken(name, queue)) == 1
