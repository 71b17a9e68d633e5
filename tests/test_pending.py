"""Pending calls until commit: what they carry, that readers cannot alter them, what they hold.

A big transaction keeps every deferred call in memory until its commit, so calls keep their
encoded arguments frozen (shared, immutable) and build the message body on each read.
"""

from __future__ import annotations

import datetime
import gc
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection, transaction
from django.db.models.signals import post_save
from kombu.utils import json as kombu_json

from deferred_signals import connect, registry
from deferred_signals.codec import TAG, Encoder
from deferred_signals.dispatch import PendingCall
from deferred_signals.frozen import MAX_SHARED_KEYS, freeze, thaw
from tests.testapp.models import Author

NAME = "tests.pending_author"
#: What the deferred handler received, in this process (EAGER).
RECEIVED: list[dict[str, Any]] = []


def author_saved(sender: Any, instance: Author, created: bool, **kwargs: Any) -> None:
    RECEIVED.append({"sender": sender, "name": instance.name, "created": created, **kwargs})


@contextmanager
def deferred_author_handler() -> Iterator[None]:
    RECEIVED.clear()
    connect(post_save, author_saved, sender=Author, defer=True, name=NAME)
    try:
        yield
    finally:
        post_save.disconnect(author_saved, sender=Author)
        registry.unregister(NAME)


def pending(handler: str = NAME) -> list[PendingCall]:
    callbacks = [entry[1] for entry in connection.run_on_commit]
    return [
        callback
        for callback in callbacks
        if isinstance(callback, PendingCall) and callback.handler.name == handler
    ]


@pytest.mark.django_db(transaction=True)
def test_a_pending_call_carries_the_message_body() -> None:
    with deferred_author_handler(), transaction.atomic():
        author = Author.objects.create(name="a")
        (call,) = pending()
        expected = {
            "v": 1,
            "signal": 0,
            "sender": {TAG: "modelclass", "v": "testapp.Author"},
            "kwargs": {
                "instance": {
                    TAG: "model",
                    "m": "testapp.author",
                    "pk": author.pk,
                    "db": "default",
                    "fresh": True,
                },
                "created": True,
                "update_fields": None,
                "raw": False,
                "using": "default",
            },
        }
        assert call.body == expected
        assert kombu_json.dumps(call.body) == kombu_json.dumps(expected)  # the keys' order too
        assert "at" not in call.body  # not committed yet


@pytest.mark.django_db(transaction=True)
def test_what_a_reader_does_to_a_body_reaches_no_call() -> None:
    with deferred_author_handler():
        with transaction.atomic():
            Author.objects.create(name="first")
            Author.objects.create(name="second")
            first, second = pending()
            body = first.body
            body["sender"]["v"] = "testapp.Article"
            body["kwargs"]["instance"]["pk"] = -1
            body["kwargs"]["created"] = False
            body["kwargs"]["update_fields"] = {TAG: "frozenset", "v": ["name"]}
            assert first.body != body
            assert (
                first.body["sender"]
                == second.body["sender"]
                == {
                    TAG: "modelclass",
                    "v": "testapp.Author",
                }
            )
            assert first.body["kwargs"]["created"] is True
        assert [(call["name"], call["created"]) for call in RECEIVED] == [
            ("first", True),
            ("second", True),
        ]
        assert all(call["sender"] is Author and call["update_fields"] is None for call in RECEIVED)


@pytest.mark.django_db(transaction=True)
def test_the_body_read_after_commit_says_when() -> None:
    seen: list[PendingCall] = []
    with deferred_author_handler(), transaction.atomic():
        Author.objects.create(name="a")
        seen += pending()
    (call,) = seen
    first, second = call.body, call.body
    assert first is not second  # a dict of its own on each read
    assert isinstance(first["at"], float)
    assert first["at"] == second["at"] == call.at  # the commit time flush() stamped


@pytest.mark.parametrize(
    "value",
    [
        None,
        "text",
        {},
        [],
        {"a": [1, 2.5, {"b": None}], "c": {"d": []}},
        [[1, [2, [3]]], {"x": True}],
        {"a": 1, "b": True},  # equal values of other types stay themselves: 1 and True
        {"a": True, "b": 1},
        Decimal("1.50"),
        datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        datetime.timedelta(days=1, seconds=2),
        (1, "a"),
        frozenset({"b", "a"}),
        {1: "not a str key", "k": "v"},
        {TAG: "looks tagged"},
        uuid.UUID(int=5),
    ],
)
def test_frozen_arguments_thaw_to_the_same_json(value: Any) -> None:
    encoded = Encoder(fresh=True, fields=False).encode(value)
    thawed = thaw(freeze(encoded))
    assert thawed == encoded
    assert kombu_json.dumps(thawed) == kombu_json.dumps(encoded)  # same types, same key order


def test_each_thaw_builds_containers_of_its_own() -> None:
    frozen = freeze({"a": [1, {"b": [2]}], "c": {"d": 3}})
    first, second = thaw(frozen), thaw(frozen)
    first["a"][1]["b"].append(4)
    first["c"]["d"] = 5
    assert second == thaw(frozen) == {"a": [1, {"b": [2]}], "c": {"d": 3}}


def test_key_sharing_is_bounded() -> None:
    values = [{f"key {n}": n} for n in range(MAX_SHARED_KEYS + 10)]
    assert [thaw(freeze(value)) for value in values] == values


# --- what pending calls hold until commit -----------------------------------------------


def held_per_save(save: Callable[[int], None], saves: int = 2000) -> float:
    """Bytes still allocated per save, just before the commit (tracemalloc)."""
    with transaction.atomic():
        for n in range(20):  # warm: statements, caches
            save(n)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for n in range(saves):
                save(n)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        transaction.set_rollback(True)
    return sum(stat.size_diff for stat in after.compare_to(before, "filename")) / saves


def idiom_author_saved(sender: Any, instance: Author, created: bool, **kwargs: Any) -> None:
    transaction.on_commit(lambda: RECEIVED.append({"pk": instance.pk, "created": created}))


@pytest.mark.django_db(transaction=True)
def test_a_pending_call_holds_less_than_the_hand_written_idiom() -> None:
    """Issue 10, target 6: ``on_commit(lambda: task.delay(instance.pk, created))`` per save."""

    def save(n: int) -> None:
        Author.objects.create(name="m")

    with deferred_author_handler():
        ours = held_per_save(save)
    post_save.connect(idiom_author_saved, sender=Author, weak=False)
    try:
        idiom = held_per_save(save)
    finally:
        post_save.disconnect(idiom_author_saved, sender=Author)
    print(f"held per pending call: ours {ours:.0f} bytes, the idiom {idiom:.0f}")
    assert ours <= idiom, f"{ours:.0f} bytes per pending call, the idiom {idiom:.0f}"
