"""The trace kept with an outbox row, read back and written into a message: its edges.

The chain itself (request → outbox row → relay → worker) is proven end to end in
tests/test_sentry.py and tests/test_tracing.py; here, what a relay must survive: text it did
not write, a tracer that fails, and messages of other calls published meanwhile.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery.signals import before_task_publish

from deferred_signals import propagation

SENTRY = {
    "sentry-trace": "a" * 32 + "-" + "b" * 16 + "-1",
    "baggage": "sentry-trace_id=" + "a" * 32,
}
OTEL = {"traceparent": "00-" + "c" * 32 + "-" + "d" * 16 + "-01", "baggage": "tenant=acme"}


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[1, 2]", '{"sentry": "a string"}', '{"other": {"k": "v"}}', "null"],
)
def test_text_it_did_not_write_reads_as_no_trace(text: str) -> None:
    assert propagation.parse(text) == {}


def test_values_that_are_not_text_are_left_out() -> None:
    text = json.dumps({"sentry": {"sentry-trace": "t", "bad": 1}, "otel": {"traceparent": None}})
    assert propagation.parse(text) == {"sentry": {"sentry-trace": "t"}, "otel": {}}


def test_a_message_gets_both_tracers_headers_and_one_baggage() -> None:
    headers: dict[str, Any] = {"id": "call", "headers": {"kept": "as it was"}}
    propagation.apply(headers, {"sentry": dict(SENTRY), "otel": dict(OTEL)})
    assert headers["traceparent"] == OTEL["traceparent"]
    assert headers["sentry-trace"] == SENTRY["sentry-trace"]
    assert headers["baggage"] == f"{SENTRY['baggage']},tenant=acme"
    nested = headers["headers"]
    assert nested["kept"] == "as it was"  # another tool's nested headers stay
    assert nested["sentry-trace"] == SENTRY["sentry-trace"]
    assert nested["baggage"] == headers["baggage"]
    assert isinstance(headers["sentry-task-enqueued-time"], float)


def test_a_publish_span_of_the_relays_own_keeps_its_traceparent() -> None:
    """OpenTelemetry's receiver ran first (per-call path) and wrote its child span's."""
    headers: dict[str, Any] = {"traceparent": "00-child"}
    propagation.apply(headers, {"otel": dict(OTEL)})
    assert headers["traceparent"] == "00-child"


def test_the_per_call_receiver_writes_only_its_own_calls_message() -> None:
    text = json.dumps({"sentry": SENTRY})
    with propagation.continued_per_call(text, "relayed-call"):
        other: dict[str, Any] = {"id": "another-call"}
        before_task_publish.send(sender="task", headers=other)
        assert "sentry-trace" not in other
        mine: dict[str, Any] = {"id": "relayed-call"}
        before_task_publish.send(sender="task", headers=mine)
        assert mine["sentry-trace"] == SENTRY["sentry-trace"]
    after: dict[str, Any] = {"id": "relayed-call"}
    before_task_publish.send(sender="task", headers=after)
    assert "sentry-trace" not in after  # disconnected once the call is out


def test_a_failing_tracer_never_stops_a_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import context

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a tracer whose API moved")

    monkeypatch.setattr(context, "attach", broken)
    monkeypatch.setattr(propagation, "apply", broken)
    text = json.dumps({"otel": OTEL})
    with propagation.continued_per_call(text, "relayed-call"):
        before_task_publish.send(sender="task", headers={"id": "relayed-call"})
    monkeypatch.setattr("opentelemetry.trace.get_current_span", broken)
    assert propagation.capture() == ""
