"""``RedisPush`` on a real Redis: what it refuses, key prefixes, and a batch that fails midway.

That its messages are kombu's, field by field, is proven in ``test_messages.py``; that a real
worker runs them, by every worker test on Redis (the request path publishes through it).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Producer

from deferred_signals.exceptions import PublishRefused
from deferred_signals.messages import Message, MessageBuilder
from deferred_signals.redispush import RedisPush
from tests.conftest import current, require
from tests.private_redis import oom, oom_over
from tests.workers import PUBLISH_REDIS_URL, make_app

URL = PUBLISH_REDIS_URL
HANDLER = "tests.user_event"


@pytest.fixture
def redis_client() -> Iterator[Any]:
    require("redis")
    import redis

    client = redis.Redis.from_url(URL)
    keys: list[str] = []
    client.cleanup_keys = keys  # type: ignore[attr-defined]
    yield client
    if keys:
        client.delete(*keys)


def new_queue(redis_client: Any) -> str:
    """A queue name of this test's own, its list deleted at the end."""
    queue = f"ds-push-{uuid.uuid4().hex[:8]}"
    redis_client.cleanup_keys.append(queue)
    return queue


def message(app: Any, queue: str, label: str = "x", **options: Any) -> Message:
    from deferred_signals import registry

    handler = registry.get(HANDLER)
    assert handler is not None
    body = {"v": 1, "signal": 0, "sender": None, "kwargs": {"label": label}}
    built = MessageBuilder(app).build(handler.task, str(uuid.uuid4()), body, {"queue": queue})
    assert built is not None
    for key, value in options.items():
        setattr(built, key, value)
    return built


def labels(client: Any, key: str) -> list[str]:
    """The labels of the messages in list ``key``, oldest first."""
    found = []
    for raw in reversed(client.lrange(key, 0, -1)):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        found.append(body[1]["kwargs"]["label"])
    return found


def test_shapes_it_does_not_write_go_to_kombu(redis_client: Any) -> None:
    app = make_app("push-refuses", URL)
    queue = f"ds-push-{uuid.uuid4().hex[:8]}"
    with current(app), app.connection_for_write() as connection:
        push = RedisPush.of(Producer(connection))
        assert push is not None
        assert not push.add(message(app, queue, compression="zlib"))
        assert not push.add(message(app, queue, serializer="pickle"))
        assert not push.add(message(app, queue, exchange="an-exchange"))
        assert not push.add(message(app, queue, properties={"content_type": "text/plain"}))
        assert push.pending == []
        assert push.add(message(app, queue, properties={"mandatory": None, "priority": None}))
        push.pending.clear()


def test_not_a_redis_channel() -> None:
    app = make_app("push-memory", "memory://")
    with app.connection_for_write() as connection:
        assert RedisPush.of(Producer(connection)) is None


@pytest.mark.parametrize("missing", ["_q_for_pri", "_get_message_priority", "pool"])
def test_a_kombu_without_an_internal_it_reproduces_publishes_its_own_way(
    redis_client: Any, missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kombu that renamed a private it relies on: kombu's path, never a failed publish."""
    from kombu.transport import redis as kombu_redis

    # Wherever in its classes kombu defines it.
    owner = next(cls for cls in kombu_redis.Channel.__mro__ if missing in vars(cls))
    monkeypatch.delattr(owner, missing)
    app = make_app("push-kombu-internals", URL)
    with app.connection_for_write() as connection:
        assert RedisPush.of(Producer(connection)) is None


def test_a_kombu_channel_without_queue_expiry_is_written(redis_client: Any) -> None:
    """kombu < 5.6 keeps no ``_expires`` (queues with x-expires) on its Redis channel."""
    app = make_app("push-no-expires", URL)
    queue = new_queue(redis_client)
    with current(app), app.connection_for_write() as connection:
        producer = Producer(connection)
        vars(producer.channel).pop("_expires", None)  # as kombu 5.5 builds it
        assert not hasattr(producer.channel, "_expires")
        push = RedisPush.of(producer)
        assert push is not None
        assert push.add(message(app, queue, "kept"))
        push.flush()
    assert labels(redis_client, queue) == ["kept"]


def test_a_key_prefix_is_applied_as_kombu_applies_it(redis_client: Any) -> None:
    app = make_app("push-prefix", URL)
    app.conf.broker_transport_options = {"global_keyprefix": "dsprefix:"}
    queue = f"ds-push-{uuid.uuid4().hex[:8]}"
    redis_client.cleanup_keys.append(f"dsprefix:{queue}")
    with current(app), app.connection_for_write() as connection:
        push = RedisPush.of(Producer(connection))
        assert push is not None
        assert push.add(message(app, queue, "one"))
        assert push.add(message(app, queue, "two"))
        push.flush()
    assert labels(redis_client, f"dsprefix:{queue}") == ["one", "two"]
    assert redis_client.llen(queue) == 0


def test_a_list_of_another_type_refuses_only_its_own_messages(redis_client: Any) -> None:
    """``WRONGTYPE`` fails one ``LPUSH`` as it runs, and Redis runs the others of the
    ``MULTI``/``EXEC``: the refusal names the calls Redis took (published, not to be spilled)
    and the first refused one. Alone in its write, the whole run is refused, no outage."""
    app = make_app("push-errors", URL)
    good, wrong = (f"ds-push-{uuid.uuid4().hex[:8]}" for _ in range(2))
    redis_client.cleanup_keys.extend([good, wrong])
    redis_client.set(wrong, "not a list")  # LPUSH to it: WRONGTYPE

    with current(app), app.connection_for_write() as connection:
        producer = Producer(connection)
        push = RedisPush.of(producer)
        assert push is not None
        sent = [
            message(app, queue, label)
            for queue, label in ((good, "before"), (wrong, "refused"), (good, "after"))
        ]
        for each in sent:
            assert push.add(each)
        with pytest.raises(PublishRefused, match="WRONGTYPE") as refused:
            push.flush()
        assert labels(redis_client, good) == ["before", "after"]
        ids = [each.headers["id"] for each in sent]
        assert refused.value.published_after == {ids[0], ids[2]}
        assert refused.value.refused_call == ids[1]
        # A run of messages to one list is one command: all of them or none.
        sent = [message(app, wrong, label) for label in ("refused 1", "refused 2")]
        for each in sent:
            assert push.add(each)
        with pytest.raises(PublishRefused, match="WRONGTYPE") as refused:
            push.flush()
        assert refused.value.published_after == frozenset()
        assert refused.value.refused_call == sent[0].headers["id"]
        used = producer.channel._deferred_signals_connection
        assert used._sock is not None, "every reply was read: the socket is in step"

        assert push.add(message(app, good, "next"))
        push.flush()
    assert labels(redis_client, good) == ["before", "after", "next"]


@pytest.mark.parametrize("queues", [1, 2])
def test_an_error_reply_fails_the_batch_and_the_next_uses_a_new_socket(
    private_redis: Any,
    queues: int,
) -> None:
    server = private_redis()  # made short of memory: not the shared server
    app = make_app("push-errors", server.url)
    targets = [f"ds-push-{uuid.uuid4().hex[:8]}" for _ in range(queues)]
    import redis

    with current(app), app.connection_for_write() as connection:
        producer = Producer(connection)
        push = RedisPush.of(producer)
        assert push is not None
        for queue in targets:
            assert push.add(message(app, queue, "refused"))
        oom(server)
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            push.flush()
        oom_over(server)
        used = producer.channel._deferred_signals_connection
        assert used._sock is None, "a socket that failed a batch must not be reused"

        assert push.add(message(app, targets[0], "next"))
        push.flush()  # on a new socket (redis-py reuses the Connection object)
        assert producer.channel._deferred_signals_connection._sock is not None
    assert labels(server.client, targets[0]) == ["next"]


def test_one_connection_serves_every_batch_of_a_producer(redis_client: Any) -> None:
    app = make_app("push-reuse", URL)
    queue = new_queue(redis_client)
    with current(app), app.connection_for_write() as connection:
        producer = Producer(connection)
        seen = set()
        for batch in range(3):
            push = RedisPush.of(producer)
            assert push is not None
            for i in range(batch + 1):
                assert push.add(message(app, queue, f"{batch}.{i}"))
            push.flush()
            seen.add(id(producer.channel._deferred_signals_connection))
        assert len(seen) == 1
        pool = producer.channel.pool
        assert producer.channel._deferred_signals_connection in pool._in_use_connections
    assert labels(redis_client, queue) == ["0.0", "1.0", "1.1", "2.0", "2.1", "2.2"]


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    redis = pytest.importorskip("redis")
    from deferred_signals import redis_wire

    pairs = [
        ("queue", "héllo"),
        ("queue", "again"),
        ("queue\x06\x163", "x" * 7000),
        ("q", ""),
        ("queue", "back"),
        ("queue", "and more"),
    ]
    runs = redis_wire.runs(pairs)
    assert runs == [
        ("queue", ["héllo", "again"]),
        ("queue\x06\x163", ["x" * 7000]),
        ("q", [""]),
        ("queue", ["back", "and more"]),
    ]
    expected = redis.Connection().pack_commands([("LPUSH", key, *values) for key, values in runs])
    assert redis_wire.pack(runs) == b"".join(expected)


def test_a_run_of_messages_to_one_list_is_one_command_in_their_order(redis_client: Any) -> None:
    """Ten messages to one queue cost one LPUSH (one reply), and a consumer still takes them
    oldest first; a message to another list in between starts a new command."""
    app = make_app("push-runs", URL)
    queue, other = new_queue(redis_client), new_queue(redis_client)
    sent: list[bytes] = []
    with current(app), app.connection_for_write() as connection:
        producer = Producer(connection)
        push = RedisPush.of(producer)
        assert push is not None
        for i in range(10):
            assert push.add(message(app, queue, f"a{i}"))
        assert push.add(message(app, other, "elsewhere"))
        for i in range(3):
            assert push.add(message(app, queue, f"b{i}"))
        push.flush()  # opens the kept connection
        kept = producer.channel._deferred_signals_connection
        original = kept.send_packed_command

        def spy(command: Any, check_health: bool = True) -> None:
            sent.extend(command)
            original(command, check_health)

        kept.send_packed_command = spy
        try:
            for i in range(5):
                assert push.add(message(app, other, f"c{i}"))
            push.flush()
        finally:
            del kept.send_packed_command
    assert labels(redis_client, queue) == [f"a{i}" for i in range(10)] + ["b0", "b1", "b2"]
    assert labels(redis_client, other) == ["elsewhere"] + [f"c{i}" for i in range(5)]
    (packed,) = sent
    assert packed.count(b"LPUSH") == 1
    assert packed.startswith(b"*7\r\n$5\r\nLPUSH\r\n")  # the key and five messages


def test_a_kept_connection_the_server_closed_is_reopened(redis_client: Any) -> None:
    # A Redis restart, an idle timeout or CLIENT KILL: redis-py's pool would have noticed at
    # checkout; the kept connection is checked the same way before each write.
    app = make_app("push-killed", URL)
    queue = new_queue(redis_client)
    with current(app), app.connection_for_write() as connection:
        producer = Producer(connection)
        push = RedisPush.of(producer)
        assert push is not None
        assert push.add(message(app, queue, "before"))
        push.flush(5.0)
        kept = producer.channel._deferred_signals_connection
        kept.send_command("CLIENT", "ID")
        client_id = kept.read_response()
        assert redis_client.client_kill_filter(_id=client_id) == 1
        assert push.add(message(app, queue, "after"))
        push.flush(5.0)
    assert labels(redis_client, queue) == ["before", "after"]


def test_a_json_encoder_of_the_projects_own_goes_through_kombu(
    redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.serialization import registry

    codec = registry._encoders["json"]
    monkeypatch.setitem(registry._encoders, "json", codec._replace(encoder=lambda v: "{}"))
    app = make_app("push-json", URL)
    with app.connection_for_write() as connection:
        assert RedisPush.of(Producer(connection)) is None


def test_a_pool_of_redis_py_before_5_3_is_asked_with_a_command_name() -> None:
    """redis-py < 5.3 requires ``get_connection(command_name)``; later ones warn when given."""
    from deferred_signals import redis_wire

    class OldPool:
        def get_connection(self, command_name: str, *keys: Any, **options: Any) -> Any:
            return ("connection for", command_name)

    class NewPool:
        def get_connection(self) -> Any:
            return "connection"

    assert redis_wire.checkout(OldPool()) == ("connection for", "LPUSH")
    assert redis_wire.checkout(NewPool()) == "connection"


# --- the envelope template of a route ---------------------------------------------------------
# RedisPush.add writes a message the builder left untouched from a JSON template of its route
# (Message.layout): each test below fails if the template wrote what it should not.


def stored(client: Any, key: str) -> list[dict[str, Any]]:
    """The envelopes in list ``key``, oldest first."""
    return [json.loads(raw) for raw in reversed(client.lrange(key, 0, -1))]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"priority": 3, "countdown": 30, "expires": 600, "time_limit": 60, "soft_time_limit": 5},
        {"priority": 0, "expires": 0},
    ],
    ids=["plain", "every option", "zero priority and expiry"],
)
def test_a_template_writes_the_very_text_the_envelope_encodes_to(
    redis_client: Any, options: dict[str, Any]
) -> None:
    import dataclasses

    from deferred_signals import registry

    handler = registry.get(HANDLER)
    assert handler is not None
    app = make_app("push-template", URL)
    queue = new_queue(redis_client)
    body = {"v": 1, "signal": 0, "sender": None, "kwargs": {"label": 'q"uo\\te é \u2028'}}
    with current(app), app.connection_for_write() as connection:
        push = RedisPush.of(Producer(connection))
        assert push is not None
        builder = MessageBuilder(app)
        for call_id in ("first-call", "second-call"):  # the second one reuses the template
            built = builder.build(handler.task, call_id, body, {"queue": queue, **options})
            assert built is not None and built.layout is not None
            assert push.add(built)
            assert push.add(dataclasses.replace(built, layout=None))  # encoded in full
        assert push.layouts  # the template was made
        texts = [text for _, text in push.pending]
        keys = {key for key, _ in push.pending}
        push.pending.clear()
    assert len(keys) == 1
    for templated, encoded in (texts[0:2], texts[2:4]):
        tags = [json.loads(text)["properties"]["delivery_tag"] for text in (templated, encoded)]
        assert templated.replace(tags[0], "TAG") == encoded.replace(tags[1], "TAG")


def test_a_before_task_publish_receiver_changes_a_templated_message(redis_client: Any) -> None:
    from celery.signals import before_task_publish

    from deferred_signals.producer import publish_message

    app = make_app("push-template-receiver", URL)
    queue = new_queue(redis_client)

    def receiver(headers: dict[str, Any], properties: dict[str, Any], **kwargs: Any) -> None:
        headers["added"] = "by a receiver"
        properties["priority"] = 0  # the default: the same list, another envelope
        properties["correlation_id"] = "changed"

    with current(app), app.connection_for_write() as connection:
        producer = Producer(connection, auto_declare=False)
        push = RedisPush.of(producer)
        assert push is not None
        publish_message(producer, message(app, queue, "before"), push=push)  # makes the template
        before_task_publish.connect(receiver, weak=False)
        try:
            publish_message(producer, message(app, queue, "during"), push=push)
        finally:
            before_task_publish.disconnect(receiver)
        publish_message(producer, message(app, queue, "after"), push=push)
        push.flush()
    first, changed, last = stored(redis_client, queue)
    assert changed["headers"]["added"] == "by a receiver"
    assert changed["properties"]["correlation_id"] == "changed"
    assert "added" not in first["headers"] and "added" not in last["headers"]
    assert last["properties"]["correlation_id"] == last["headers"]["id"]


def test_sentry_headers_reach_a_templated_message(redis_client: Any) -> None:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration

    from deferred_signals import sentry
    from deferred_signals.producer import publish_message
    from tests.sentry_capture import MemoryTransport, initialised

    app = make_app("push-template-sentry", URL)
    queue = new_queue(redis_client)
    with current(app), app.connection_for_write() as connection:
        producer = Producer(connection, auto_declare=False)
        push = RedisPush.of(producer)
        assert push is not None
        publish_message(producer, message(app, queue, "untraced"), push=push)
        with (
            initialised(MemoryTransport(), [CeleryIntegration()]),
            sentry_sdk.start_transaction(op="http.server", name="POST /"),
        ):
            send = sentry.publishing(publish_message)
            assert send is not publish_message
            send(producer, message(app, queue, "traced"), push=push)
        push.flush()
    untraced, traced = stored(redis_client, queue)
    assert "sentry-trace" not in untraced["headers"]
    assert traced["headers"]["sentry-trace"]
    assert traced["headers"]["headers"]["sentry-trace"] == traced["headers"]["sentry-trace"]


def test_replaced_headers_and_properties_are_encoded_as_they_are(redis_client: Any) -> None:
    app = make_app("push-template-replaced", URL)
    queue = new_queue(redis_client)
    with current(app), app.connection_for_write() as connection:
        push = RedisPush.of(Producer(connection))
        assert push is not None
        assert push.add(message(app, queue, "template"))
        plain = message(app, queue, "headers")
        assert push.add(message(app, queue, "headers", headers={**plain.headers, "x": 1}))
        properties = {**plain.properties, "reply_to": "elsewhere"}
        assert push.add(message(app, queue, "properties", properties=properties))
        push.flush()
    _, headers, properties = stored(redis_client, queue)
    assert headers["headers"]["x"] == 1
    assert properties["properties"]["reply_to"] == "elsewhere"


def test_a_message_built_in_another_thread_gets_its_own_reply_to(redis_client: Any) -> None:
    """Celery's reply_to is the thread's (``app.thread_oid``): a template is not shared."""
    import threading

    app = make_app("push-template-threads", URL)
    queue = new_queue(redis_client)
    built: list[Message] = []
    with current(app), app.connection_for_write() as connection:
        push = RedisPush.of(Producer(connection))
        assert push is not None
        assert push.add(message(app, queue, "main"))
        thread = threading.Thread(target=lambda: built.append(message(app, queue, "thread")))
        thread.start()
        thread.join()
        assert push.add(built[0])
        assert push.add(message(app, queue, "main again"))
        push.flush()
    first, other, again = stored(redis_client, queue)
    assert other["properties"]["reply_to"] == built[0].properties["reply_to"]
    assert other["properties"]["reply_to"] != first["properties"]["reply_to"]
    assert again["properties"]["reply_to"] == first["properties"]["reply_to"]


def test_a_push_is_kept_per_producer_until_its_exchange_changes(redis_client: Any) -> None:
    from kombu import Exchange

    app = make_app("push-kept", URL)
    with app.connection_for_write() as connection:
        producer = Producer(connection)
        push = RedisPush.of(producer)
        assert push is not None
        push.pending.append(("left", "by a failed batch"))
        assert RedisPush.of(producer) is push
        assert push.pending == []
        assert RedisPush.of(Producer(connection)) is not push  # another producer
        producer.exchange = Exchange("", delivery_mode=1)
        kept = RedisPush.of(producer)
        assert kept is not None and kept is not push
        producer.exchange.delivery_mode = 2
        assert RedisPush.of(producer) is not kept


def test_a_kept_connection_isstale_exactly_when_redis_pycan_read_from_it(
    redis_client: Any,
) -> None:
    """``stale`` asks with one poll what ``Connection.can_read()`` asks with a recv."""
    import time

    import redis

    from deferred_signals.redis_wire import can_read, checkout, stale

    def connected() -> Any:
        # redis-py before 5.3 wants a command name: ask as the push does.
        connection = checkout(redis.Redis.from_url(URL).connection_pool)
        connection.connect()
        return connection

    def settled(check: Any, connection: Any) -> bool:
        for _ in range(200):  # the server's answer takes a moment to arrive
            if check(connection):
                return True
            time.sleep(0.005)
        return False

    idle = connected()
    assert stale(idle) is False
    assert can_read(idle) is False
    # A reply nobody read: bytes waiting on the socket.
    for check in (stale, can_read):
        unread = connected()
        unread.send_command("PING")
        assert settled(check, unread)
    # The server closed it (a restart, an idle timeout, CLIENT KILL).
    for check in (stale, can_read):
        killed = connected()
        killed.send_command("CLIENT", "ID")
        client_id = killed.read_response()
        redis_client.execute_command("CLIENT", "KILL", "ID", client_id)
        assert settled(check, killed)
    # Bytes already in redis-py's own buffer, none on the socket.
    buffered = connected()
    buffered.send_command("PING")
    assert settled(can_read, buffered)  # reads the reply into the parser's buffer
    assert stale(buffered) is True
    for connection in (idle, unread, killed, buffered):
        connection.disconnect()


@pytest.mark.parametrize(
    "value",
    [
        {"v": 1, "signal": 0, "sender": None, "kwargs": {"label": "x", "n": 3}, "at": 1.5},
        {"kwargs": {"text": 'é \u2028 "quoted" \\ / \x00', "big": 10**30, "neg": -0.0}},
        {"nan": float("nan"), "inf": float("inf"), "list": [[], {}, [None, True, False]]},
        {"when": __import__("datetime").datetime(2026, 11, 24, 12, 0)},  # kombu's encoder
        {"shared": [{"same": 1}] * 3},  # one object in three places: no cycle
    ],
    ids=["body", "strings and numbers", "specials", "datetime", "shared"],
)
def test_a_body_encodes_as_dumps_encodes_it(value: dict[str, Any]) -> None:
    from deferred_signals.redispush import _tree, dumps, dumps_tree

    assert _tree is not None  # CPython: the fast encoder is in use
    assert dumps_tree(value) == dumps(value)


class _Replies:
    """A connection that reads the given replies (a transaction Redis aborted: no I/O)."""

    def __init__(self, *replies: Any) -> None:
        self.replies = list(replies)

    def read_response(self) -> Any:
        return self.replies.pop(0)


def test_a_transaction_redis_aborted_is_not_taken_as_written() -> None:
    """``EXEC`` replies nil when Redis aborted the transaction (a ``WATCH``ed key changed):
    none of its ``LPUSH``\\es ran, so the batch fails and its calls are spilled, not lost."""
    require("redis")
    import redis

    from deferred_signals.redis_wire import read_transaction

    read_transaction(_Replies(b"OK", b"QUEUED", b"QUEUED", [1, 2]), 2)  # written
    with pytest.raises(redis.WatchError, match="nothing ran"):
        read_transaction(_Replies(b"OK", b"QUEUED", b"QUEUED", None), 2)
