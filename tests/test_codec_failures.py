"""A registered codec failing: its encode() at send time, a clear error naming the handler,
the argument and the codec; its decode() on the worker, never a silently lost call."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import current_app
from django.db import OperationalError
from django.test import override_settings

from deferred_signals import DeferredSignalError, register_codec, unregister_codec
from deferred_signals.models import DeadLetter
from tests.conftest import records
from tests.testapp.signals import user_registered


class Token:
    pass


FAILURE: list[BaseException] = []


def _decode(data: object) -> Token:
    if FAILURE:
        raise FAILURE.pop(0)
    return Token()


@pytest.fixture(autouse=True)
def token_codec() -> Any:
    register_codec(Token, name="tests.token", encode=lambda token: 1, decode=_decode)
    yield
    unregister_codec(Token)
    FAILURE.clear()


class Price:
    pass  # no ``amount``: its codec's encode() raises AttributeError


def test_a_codec_whose_encode_raises_fails_the_send_naming_handler_argument_and_codec() -> None:
    register_codec(Price, name="tests.price", encode=lambda price: [price.amount], decode=Price)
    try:
        with pytest.raises(DeferredSignalError) as info:
            user_registered.send(sender=None, label="x", order={"total": Price()})
    finally:
        unregister_codec(Price)
    message = str(info.value)
    assert message.startswith(
        "Deferred handler 'tests.user_event' cannot receive argument \"order['total']\": "
    )
    assert "the encode() of codec 'tests.price' (registered for Price) raised AttributeError(" in (
        message
    )
    assert "'amount'" in message and "fix the codec" in message
    assert isinstance(info.value.__cause__, AttributeError)  # the codec's own traceback


def run(call_id: str, **extra: Any) -> Any:
    body = {
        "v": 1, "signal": 0, "sender": None,
        "kwargs": {"label": call_id, "t": {"$t": "x:tests.token", "v": 1}}, **extra,
    }  # fmt: skip
    with override_settings(DEFERRED_SIGNALS={}):
        return current_app.tasks["tests.user_event"].apply(kwargs=body, task_id=call_id)


@pytest.mark.django_db(transaction=True)
def test_a_database_outage_in_a_codec_is_retried_like_the_handlers_own() -> None:
    FAILURE.extend([OperationalError("the database is down")] * 2)
    assert run("codec-db").successful()  # retried twice (eagerly here), then run
    assert [r.call["kwargs"]["label"]["repr"] for r in records("user_event")] == ["'codec-db'"]
    assert not DeadLetter.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_codec_outage_past_the_window_is_a_dead_letter() -> None:
    FAILURE.append(OperationalError("the database is down"))
    result = run("codec-late", dbf=time.time() - 10_000)
    assert isinstance(result.result, OperationalError)
    assert DeadLetter.objects.get(call_id="codec-late").exception.endswith("OperationalError")


@pytest.mark.django_db(transaction=True)
def test_any_other_codec_error_is_a_refused_message_kept_as_a_dead_letter() -> None:
    FAILURE.append(RuntimeError("cannot read that"))
    result = run("codec-bug")
    assert result.state == "REJECTED" or result.failed()
    letter = DeadLetter.objects.get(call_id="codec-bug")
    assert "codec 'x:tests.token' could not decode" in letter.message


@pytest.mark.django_db(transaction=True)
def test_a_codec_outage_is_told_to_the_metrics_signals_as_the_handlers_own_is() -> None:
    """A retry for an outage met while decoding is a retry all the same: ``handler_retried``
    (``database=True``) counts it, as for one met in the handler; the handler never started,
    so neither ``handler_started`` nor ``handler_failed`` is sent for that attempt."""
    from deferred_signals import current_call, signals

    events: list[tuple[str, int, bool | None, str | None]] = []

    def on(name: str) -> Any:
        def receiver(sender: Any, attempt: int, database: bool | None = None, **_: Any) -> None:
            call = current_call()
            events.append((name, attempt, database, None if call is None else call.id))

        return receiver

    receivers = {
        signal: on(name)
        for name, signal in [
            ("started", signals.handler_started),
            ("succeeded", signals.handler_succeeded),
            ("failed", signals.handler_failed),
            ("retried", signals.handler_retried),
        ]
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver)
    try:
        FAILURE.extend([OperationalError("the database is down")] * 2)
        assert run("codec-told").successful()
    finally:
        for signal, receiver in receivers.items():
            signal.disconnect(receiver)
    assert events == [
        ("retried", 1, True, "codec-told"),
        ("retried", 2, True, "codec-told"),
        ("started", 3, None, "codec-told"),
        ("succeeded", 3, None, "codec-told"),
    ]
