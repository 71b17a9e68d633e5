"""What the relay writes to Redis for an outbox row: the message encoding its body gives.

The relay puts the JSON text a row holds into the message instead of parsing and encoding it
again. These tests relay rows to a real Redis list nobody consumes and compare each message's
body, byte for byte, with kombu's encoding of the parsed body: what the relay wrote before.
"""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery.signals import before_task_publish
from django.utils import timezone
from kombu.utils import json as kombu_json

from deferred_signals.models import OutboxCall
from deferred_signals.outbox import body_text
from deferred_signals.relay import Relay
from tests.conftest import Queue

pytestmark = pytest.mark.django_db(transaction=True)

EVENT = "tests.user_event"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
CREATED = datetime.datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=datetime.timezone.utc)


def body(**kwargs: Any) -> dict[str, Any]:
    return {"v": 1, "signal": 0, "sender": None, "kwargs": kwargs}


def add_row(id: str, text: str) -> None:
    now = timezone.now()
    OutboxCall.objects.create(id=id, handler=EVENT, body=text, created=CREATED, next_attempt_at=now)


def sent(queue: Queue) -> dict[str, bytes]:
    """The body of each message in ``queue``, as the worker will decode it, by call id."""
    return {m["headers"]["id"]: base64.b64decode(m["body"]) for m in queue.messages()}


def encoded(text: str) -> bytes:
    """The message body the relay wrote by parsing ``text`` and encoding it again."""
    parsed = kombu_json.loads(text)
    parsed.setdefault("at", CREATED.timestamp())
    return kombu_json.dumps([[], parsed, EMBED]).encode()


@contextmanager
def connected(receiver: Any) -> Iterator[None]:
    before_task_publish.connect(receiver, weak=False)
    try:
        yield
    finally:
        before_task_publish.disconnect(receiver)


def test_each_message_body_is_byte_for_byte_its_encoded_row(redis_queue: Queue) -> None:
    texts = {
        # Spilled after a commit: the body says when.
        "stamped": body_text({**body(label="a"), "at": 1764000000.654321}),
        # Written in the transaction: the row's creation stands in for the commit.
        "unstamped": body_text(
            body(
                label='é ☃ \U0001f600 "quoted" \\ \n \x7f \udc80',
                n=-3,
                x=0.1,
                big=10**20,
                nested=[{"$t": "dec", "v": "9.99"}, None, True, {"deep": [[], {}]}],
            )
        ),
        # Not the way body_text ends a body: encoded again, as before.
        "trailing": body_text(body(label="t")) + "\n",
    }
    for id, text in texts.items():
        add_row(id, text)
    # With a receiver connected the relay encodes every body again: nothing to compare.
    assert not before_task_publish.receivers
    assert Relay().run_once() == len(texts)
    messages = sent(redis_queue)
    assert sorted(messages) == sorted(texts)
    for id, text in texts.items():
        assert messages[id] == encoded(text), id
    assert json.loads(messages["unstamped"])[1]["at"] == CREATED.timestamp()
    assert not OutboxCall.objects.exists()


def test_a_before_task_publish_receiver_may_still_change_the_body(redis_queue: Queue) -> None:
    def change(body: Any, **kwargs: Any) -> None:
        body[1]["kwargs"]["label"] = "changed"

    add_row("changed", body_text(body(label="stored")))
    with connected(change):
        assert Relay().run_once() == 1
    (message,) = sent(redis_queue).values()
    assert json.loads(message)[1]["kwargs"]["label"] == "changed"


def test_kombus_own_json_forms_are_read_by_kombus_decoder_as_before(redis_queue: Queue) -> None:
    # The codec never writes them (it tags such dicts); a row that holds one anyway is read
    # the way the relay always read it: a known form decoded, an unknown one refused.
    known = body_text(body(when={"__type__": "datetime", "__value__": CREATED.isoformat()}))
    add_row("known", known)
    add_row("unknown", body_text(body(what={"__type__": "nope", "__value__": 1})))
    assert Relay().run_once() == 1
    assert sent(redis_queue) == {"known": encoded(known)}
    row = OutboxCall.objects.get()
    assert row.id == "unknown" and row.attempts == 1 and "not JSON" in row.last_error
