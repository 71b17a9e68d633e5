"""The lean message builder against ``Task.apply_async``: the same message, field by field.

Each test publishes one call through ``apply_async`` and the same call through
``MessageBuilder`` + ``publish_message`` on a real Redis, and compares what reached
``Producer.publish`` and what reached the Redis list. The end-to-end test has a real
worker run a message published by the builder, on Redis and on RabbitMQ.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from celery.signals import after_task_publish, before_task_publish
from kombu import Producer
from kombu.utils import json as kombu_json

from deferred_signals import registry
from deferred_signals.messages import PROPERTIES_LEFT_OUT, MessageBuilder, summary
from deferred_signals.producer import publish_fallback, publish_message
from deferred_signals.redispush import RedisPush
from tests.conftest import current, records, require, wait_for
from tests.workers import PUBLISH_REDIS_URL, Worker, make_app

URL = PUBLISH_REDIS_URL
NOW = datetime.datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=datetime.timezone.utc)
HANDLER = "tests.user_event"


@dataclass
class Broker:
    app: Celery
    redis: Any
    queues: list[str]

    def queue(self) -> str:
        name = f"ds-messages-{uuid.uuid4().hex[:8]}"
        self.queues.append(name)
        return name

    def raw(self, queue: str) -> list[dict[str, Any]]:
        """The messages in ``queue``, oldest first, as JSON documents.

        kombu keeps a message with a priority in a list of its own, ``queue\x06\x16<n>``.
        """
        keys = [queue, *self.redis.keys(f"{queue}\x06\x16*")]
        self.queues.extend(key.decode() for key in keys[1:])
        return [json.loads(raw) for key in keys for raw in reversed(self.redis.lrange(key, 0, -1))]


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    require("redis")
    import redis

    app = make_app(f"messages-{uuid.uuid4().hex[:6]}", URL)
    # eta and expires are computed from now: both paths read the same clock.
    monkeypatch.setattr(app, "now", lambda: NOW)
    found = Broker(app, redis.Redis.from_url(URL), [])
    with current(app):
        yield found
    app.close()
    if found.queues:
        found.redis.delete(*found.queues)


@dataclass
class Published:
    """One ``Producer.publish`` call: its body and keyword arguments, copied."""

    body: Any
    kwargs: dict[str, Any]


@contextmanager
def recording(producer: Producer) -> Iterator[list[Published]]:
    calls: list[Published] = []
    original = producer.publish

    def publish(body: Any, **kwargs: Any) -> Any:
        # Copied before kombu adds what it adds in place (delivery tags).
        kwargs = {k: v for k, v in kwargs.items() if k != "declare"}
        calls.append(Published(copy.deepcopy(body), copy.deepcopy(kwargs)))
        return original(body, **kwargs)

    producer.publish = publish  # type: ignore[method-assign,assignment]
    try:
        yield calls
    finally:
        del producer.publish


def task() -> Any:
    handler = registry.get(HANDLER)
    assert handler is not None
    return handler.task


def body(label: str) -> dict[str, Any]:
    """A message body as the proxy encodes it (``tests.user_event``, first signal)."""
    return {"v": 1, "signal": 0, "sender": None, "kwargs": {"label": label, "n": 3}}


def via_apply_async(app: Celery, call_id: str, options: dict[str, Any]) -> Published:
    with app.producer_or_acquire() as producer, recording(producer) as calls:
        task().apply_async(
            kwargs=body("same"),
            task_id=call_id,
            producer=producer,
            argsrepr="()",
            kwargsrepr=summary(body("same")),
            retry=False,
            **options,
        )
    (call,) = calls
    return call


def via_builder(app: Celery, call_id: str, options: dict[str, Any]) -> Published:
    message = MessageBuilder(app).build(task(), call_id, body("same"), options)
    assert message is not None, "the builder refused a call it should build"
    with app.producer_or_acquire() as producer, recording(producer) as calls:
        publish_message(producer, message)
    (call,) = calls
    return call


def via_push(app: Celery, call_id: str, options: dict[str, Any]) -> None:
    """The request path's way on Redis: the builder's message written by ``RedisPush``."""
    message = MessageBuilder(app).build(task(), call_id, body("same"), options)
    assert message is not None
    with app.connection_for_write() as connection:
        producer = Producer(connection, auto_declare=False)
        push = RedisPush.of(producer)
        assert push is not None
        with recording(producer) as calls:
            publish_message(producer, message, push=push)
            push.flush()
        assert calls == [], "RedisPush refused the message: it went through Producer.publish"


def assert_same_message(broker: Broker, options: dict[str, Any], queue: str) -> None:
    """apply_async and the builder, one call each: same publish arguments, same stored JSON;
    and a third call through ``RedisPush``, which must store the very same JSON as kombu."""
    ids = [str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())]
    celery = via_apply_async(broker.app, ids[0], options)
    ours = via_builder(broker.app, ids[1], options)
    via_push(broker.app, ids[2], options)
    # The call id is the one field meant to differ; put it back, then compare everything.
    for call in (celery, ours):
        call.kwargs["headers"]["id"] = call.kwargs["headers"]["root_id"] = "ID"
        call.kwargs["correlation_id"] = "ID"
    # apply_async(kwargsrepr=...) copies both reprs among the properties too; the builder
    # leaves those copies out (they stay in the headers): the one deliberate difference.
    for key in PROPERTIES_LEFT_OUT:
        assert celery.kwargs.pop(key) == celery.kwargs["headers"][key]
        assert key not in ours.kwargs
    # The other: ours are mandatory, so that AMQP returns a message no queue takes rather
    # than acking and dropping it (Redis ignores the flag; the stored JSON is the same).
    assert ours.kwargs.pop("mandatory") is True
    assert not celery.kwargs.pop("mandatory", None)
    assert ours.body == celery.body
    assert type(ours.body) is type(celery.body)
    assert sorted(ours.kwargs) == sorted(celery.kwargs)
    for key, value in celery.kwargs.items():
        assert ours.kwargs[key] == value, key
    assert list(ours.kwargs["headers"]) == list(celery.kwargs["headers"])  # same order too

    stored = broker.raw(queue)
    assert len(stored) == 3
    tags = set()
    for message, call_id in zip(stored, ids, strict=True):
        assert message["headers"]["id"] == message["properties"]["correlation_id"] == call_id
        message["headers"]["id"] = message["headers"]["root_id"] = "ID"
        message["properties"]["correlation_id"] = "ID"
        tags.add(message["properties"].pop("delivery_tag"))  # unique per message
    assert len(tags) == 3
    celery_stored, ours_stored, pushed = stored
    for key in PROPERTIES_LEFT_OUT:
        assert celery_stored["properties"].pop(key) == celery_stored["headers"][key]
    assert ours_stored == celery_stored
    assert pushed == celery_stored
    assert list(pushed) == list(celery_stored)
    assert sorted(pushed["properties"]) == sorted(celery_stored["properties"])
    assert json.loads(base64.b64decode(ours_stored["body"])) == [[], body("same"), EMBED]


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_a_plain_handler_message_is_apply_asyncs(broker: Broker) -> None:
    queue = broker.queue()
    assert_same_message(broker, {"queue": queue}, queue)


def test_publish_options_give_the_same_headers_and_properties(broker: Broker) -> None:
    queue = broker.queue()
    options = {
        "queue": queue,
        "priority": 3,
        "countdown": 30,
        "expires": 600,
        "time_limit": 60,
        "soft_time_limit": 50,
    }
    assert_same_message(broker, options, queue)
    (message, _, _) = broker.raw(queue)
    assert message["headers"]["eta"] == (NOW + datetime.timedelta(seconds=30)).isoformat()
    assert message["headers"]["expires"] == (NOW + datetime.timedelta(seconds=600)).isoformat()
    assert message["headers"]["timelimit"] == [60, 50]
    assert message["properties"]["priority"] == 3
    assert message["properties"]["expiration"] == "600000"


def test_the_default_queue_without_a_queue_option(broker: Broker) -> None:
    queue = broker.queue()
    broker.app.conf.task_default_queue = queue
    assert_same_message(broker, {}, queue)


def test_task_routes_route_the_handler(broker: Broker) -> None:
    queue = broker.queue()
    broker.app.conf.task_routes = {HANDLER: {"queue": queue, "priority": 7}}
    assert_same_message(broker, {}, queue)
    assert [m["properties"]["priority"] for m in broker.raw(queue)] == [7, 7, 7]


def test_new_task_routes_are_followed(broker: Broker) -> None:
    first, second = broker.queue(), broker.queue()
    app = broker.app
    app.conf.task_routes = {HANDLER: {"queue": first}}
    assert_same_message(broker, {}, first)
    # Celery's router keeps the routes it was built with: a project that changes them
    # rebuilds it, and the builder follows (its cache checks the router and the setting).
    app.conf.task_routes = {"tests.*": {"queue": second}}
    app.amqp.flush_routes()
    app.amqp.router = app.amqp.Router()  # type: ignore[misc]
    assert_same_message(broker, {}, second)
    assert len(broker.raw(first)) == 3


def test_a_routing_function_is_asked_on_every_call(broker: Broker) -> None:
    queues = [broker.queue(), broker.queue()]
    seen: list[dict[str, Any]] = []

    def by_label(name: str, args: Any, kwargs: dict[str, Any], options: Any, **kw: Any) -> Any:
        seen.append(kwargs)
        return {"queue": queues[kwargs["kwargs"]["n"] % 2]}

    broker.app.conf.task_routes = [by_label]
    builder = MessageBuilder(broker.app)
    assert builder.build(task(), str(uuid.uuid4()), body("routed"), {}) is None
    with broker.app.producer_or_acquire() as producer:
        publish_fallback(producer, task(), str(uuid.uuid4()), body("routed"), {})
    assert seen == [body("routed")]
    assert len(broker.raw(queues[1])) == 1


def test_publish_signals_get_celerys_arguments_and_headers_survive(broker: Broker) -> None:
    queue = broker.queue()
    seen: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}

    def before(**kwargs: Any) -> None:
        kwargs["headers"]["traceparent"] = f"00-{kwargs['headers']['id']}"
        seen["before"].append(copy.deepcopy({k: v for k, v in kwargs.items() if k != "signal"}))

    def after(**kwargs: Any) -> None:
        seen["after"].append(copy.deepcopy({k: v for k, v in kwargs.items() if k != "signal"}))

    before_task_publish.connect(before, weak=False)
    after_task_publish.connect(after, weak=False)
    try:
        via_apply_async(broker.app, "call-1", {"queue": queue, "priority": 2, "expires": 60})
        via_builder(broker.app, "call-1", {"queue": queue, "priority": 2, "expires": 60})
    finally:
        before_task_publish.disconnect(before)
        after_task_publish.disconnect(after)
    celery_properties = seen["before"][0]["properties"]
    for key in PROPERTIES_LEFT_OUT:  # the one deliberate difference (assert_same_message)
        assert celery_properties.pop(key) == seen["before"][0]["headers"][key]
    for name in ("before", "after"):
        celery, ours = seen[name]
        assert sorted(ours) == sorted(celery)
        for key, value in celery.items():
            assert ours[key] == value, (name, key)
    assert [m["headers"]["traceparent"] for m in broker.raw(queue)] == ["00-call-1"] * 2


def test_a_queue_is_declared_on_each_new_connection(broker: Broker) -> None:
    # On Redis a declaration is the queue's binding to its exchange, kept in a set: a missing
    # queue gets a direct exchange of its own name.
    queue = broker.queue()
    binding = f"_kombu.binding.{queue}"
    broker.queues.append(binding)
    builder = MessageBuilder(broker.app)
    for _ in range(2):
        broker.redis.delete(binding)  # as if the broker had lost it
        with broker.app.connection_for_write() as connection:
            producer = Producer(connection)
            for _ in range(3):
                message = builder.build(task(), str(uuid.uuid4()), body("x"), {"queue": queue})
                assert message is not None
                publish_message(producer, message)
        assert broker.redis.smembers(binding) == {f"{queue}\x06\x16\x06\x16{queue}".encode()}
    assert len(broker.raw(queue)) == 6


@pytest.mark.parametrize("setting", ["task_always_eager", "task_send_sent_event"])
def test_eager_mode_and_sent_events_take_the_per_call_path(broker: Broker, setting: str) -> None:
    options = {"queue": broker.queue()}
    assert MessageBuilder(broker.app).build(task(), "a", body("x"), options) is not None
    setattr(broker.app.conf, setting, True)
    assert MessageBuilder(broker.app).build(task(), "a", body("x"), options) is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.worker
def test_a_real_worker_runs_a_message_from_the_builder(deferred_to: Worker) -> None:
    label = uuid.uuid4().hex
    call_body = {"v": 1, "signal": 0, "sender": None, "kwargs": {"label": label}}
    call_id = str(uuid.uuid4())
    app = deferred_to.app
    message = MessageBuilder(app).build(task(), call_id, call_body, {"queue": deferred_to.queue})
    assert message is not None
    with app.connection_for_write() as connection:
        publish_message(Producer(connection), message, timeout=5, confirm_timeout=5)

    def ran() -> list[Any]:
        calls = records("user_event")
        return [r for r in calls if r.call["kwargs"]["label"]["repr"] == repr(label)]

    (record,) = wait_for(ran, what="the handler run from the builder's message")
    assert record.pid != os.getpid()  # the worker ran it


def test_a_changed_django_setting_recomputes_the_route(settings: Any) -> None:
    # The project's app reads CELERY_* from Django settings, live: override_settings changes
    # Celery's default queue for apply_async, and setting_changed makes the builder follow.
    from tests.celery_app import app

    def routing_key(options: dict[str, Any]) -> tuple[Any, Any]:
        message = MessageBuilder(app).build(task(), "id", body("x"), options)
        assert message is not None
        return message.routing_key, via_apply_async(app, "id", options).kwargs["routing_key"]

    with current(app):
        settings.CELERY_TASK_DEFAULT_QUEUE = "ds-messages-first"
        assert routing_key({}) == ("ds-messages-first", "ds-messages-first")
        settings.CELERY_TASK_DEFAULT_QUEUE = "ds-messages-second"
        assert routing_key({}) == ("ds-messages-second", "ds-messages-second")


def test_a_task_registered_again_gets_a_route_of_its_own(broker: Broker) -> None:
    options: dict[str, Any] = {"queue": broker.queue()}
    handler = registry.get(HANDLER)
    assert handler is not None
    message = MessageBuilder(broker.app).build(task(), "a", body("x"), options)
    assert message is not None and message.headers["timelimit"] == [None, None]
    # Another task object under the name, with options of its own (Celery 5.7 refuses a
    # second callable for a name, a project can still set app.tasks[name]): the shared_task
    # proxy now resolves to it, and the cached route must not hide its options.
    other = broker.app.task(name=f"{HANDLER}.v2", time_limit=60, ignore_result=True, shared=False)
    broker.app.tasks[HANDLER] = other(handler.func)
    message = MessageBuilder(broker.app).build(task(), "b", body("x"), options)
    assert message is not None and message.headers["timelimit"] == [60, None]


def test_a_body_given_as_json_text_is_written_as_that_text(broker: Broker) -> None:
    # The relay hands the builder the JSON an outbox row holds: RedisPush writes it as it
    # is, and the message must be the very one encoding the parsed body gives.
    queue = broker.queue()
    options = {"queue": queue, "priority": 3, "expires": 600}
    text = kombu_json.dumps(body("same"))
    with broker.app.connection_for_write() as connection:
        producer = Producer(connection, auto_declare=False)
        push = RedisPush.of(producer)
        assert push is not None
        for body_text in (None, text):
            message = MessageBuilder(broker.app).build(
                task(), "ID", body("same"), options, body_text
            )
            assert message is not None
            publish_message(producer, message, push=push)
        push.flush()
    encoded, given = broker.raw(queue)
    assert base64.b64decode(given["body"]) == base64.b64decode(encoded["body"])
    assert base64.b64decode(given["body"]) == kombu_json.dumps([[], body("same"), EMBED]).encode()
    for message in (encoded, given):
        del message["properties"]["delivery_tag"]  # unique per message
    assert given == encoded


def test_one_builder_routes_each_call_by_its_own_options(broker: Broker) -> None:
    # A batch mixes handlers and options: the route of one call is never another's.
    first: dict[str, Any] = {"queue": broker.queue()}
    second: dict[str, Any] = {"queue": broker.queue(), "time_limit": 60}
    builder = MessageBuilder(broker.app)
    built = [
        builder.build(task(), "id", body("x"), options) for options in (first, first, second, first)
    ]
    assert [m and (m.routing_key, m.headers["timelimit"]) for m in built] == [
        (first["queue"], [None, None]),
        (first["queue"], [None, None]),
        (second["queue"], [60, None]),
        (first["queue"], [None, None]),
    ]


def test_a_call_made_while_a_worker_runs_a_task_takes_celerys_path(broker: Broker) -> None:
    """Celery then takes the root and parent ids from the running task: ``apply_async``.
    Only the thread that runs it: another thread of the process builds its messages."""
    import threading

    from celery._state import pop_current_task, push_current_task

    options = {"queue": broker.queue()}
    running = task()._get_current_object()
    running.push_request(called_directly=False, id="running-task")
    push_current_task(running)
    try:
        assert MessageBuilder(broker.app).build(task(), "a", body("x"), options) is None
        elsewhere: list[Any] = []
        thread = threading.Thread(
            target=lambda: elsewhere.append(
                MessageBuilder(broker.app).build(task(), "b", body("x"), options)
            )
        )
        thread.start()
        thread.join()
        assert elsewhere and elsewhere[0] is not None
    finally:
        pop_current_task()
        running.pop_request()
    assert MessageBuilder(broker.app).build(task(), "c", body("x"), options) is not None


def test_a_builder_kept_for_another_batch_reads_what_a_new_one_would(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``refresh()`` between batches: settings, routes, a fork, a running task."""
    from celery._state import pop_current_task, push_current_task

    from deferred_signals import routing

    app = broker.app
    first, second = broker.queue(), broker.queue()
    builder = MessageBuilder(app)
    assert builder.build(task(), "a", body("x"), {"queue": first}) is not None
    app.conf.task_always_eager = True
    builder.refresh()
    assert builder.build(task(), "a", body("x"), {"queue": first}) is None
    app.conf.task_always_eager = False
    builder.refresh()
    assert builder.build(task(), "a", body("x"), {"queue": first}) is not None
    # New routes, in a new router: the same options now route elsewhere.
    app.conf.task_routes = {HANDLER: {"queue": second}}
    app.amqp.flush_routes()
    app.amqp.router = app.amqp.Router()  # type: ignore[misc]
    builder.refresh()
    routed = builder.build(task(), "a", body("x"), {})
    assert routed is not None and routed.routing_key == second
    # A forked child: its origin names its own pid.
    origin = builder.origin
    pid = routing._pids[0]
    routing._pids[0] = child = pid + 100_000  # what the after-fork hook does
    monkeypatch.setattr(os, "getpid", lambda: child)
    try:
        builder.refresh()
        assert builder.origin != origin and str(child) in builder.origin
    finally:
        routing._pids[0] = pid
    # A task running in the thread.
    running = task()._get_current_object()
    running.push_request(called_directly=False, id="running-task")
    push_current_task(running)
    try:
        builder.refresh()
        assert builder.build(task(), "a", body("x"), {"queue": first}) is None
    finally:
        pop_current_task()
        running.pop_request()
    builder.refresh()
    assert builder.build(task(), "a", body("x"), {"queue": first}) is not None


def test_a_producer_keeps_its_publisher_brought_up_to_date(broker: Broker) -> None:
    from deferred_signals.sending import Sender

    app = broker.app
    with app.connection_for_write() as connection:
        producer = Producer(connection, auto_declare=False)
        publish = Sender.of(app, producer)
        assert publish.push is not None
        publish.shared = ("the last call's", "body")
        assert publish.builder.build(task(), "a", body("x"), {"queue": broker.queue()})
        assert publish.builder.last is not None
        app.conf.task_always_eager = True
        again = Sender.of(app, producer)
        assert again is publish
        assert again.shared == () and again.builder.last is None and not again.builder.lean
        assert Sender.of(app, Producer(connection, auto_declare=False)) is not publish
        other = make_app(f"messages-other-{uuid.uuid4().hex[:6]}", URL)
        try:
            assert Sender.of(other, producer) is not publish
        finally:
            other.close()
