"""Tracing through a real worker: the handler's span descends from the request's span.

The request side runs OpenTelemetry's Celery instrumentation with an in-memory exporter; the
worker (another process) runs it too, writing its finished spans to a file. The chain must
read: request span -> Celery's publish span (``apply_async/<handler>``) -> the handler's run
span (``run/<handler>``), one trace id throughout, the call id on both Celery spans.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import publisher, signals, tracing
from deferred_signals.models import DeadLetter, OutboxCall
from deferred_signals.relay import Relay
from deferred_signals.replay import replay
from tests.conftest import recording_worker, use_app, wait_for
from tests.otel import ENV, read_spans, span_dict
from tests.testapp.models import Record
from tests.testapp.signals import flaky_signal
from tests.testapp.traced import traced_signal
from tests.workers import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

HANDLER = "tests.testapp.traced.traced"
FLAKY = "tests.testapp.handlers.flaky"


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def traced_worker(
    request: pytest.FixtureRequest, django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Worker, Path]]:
    """A real worker whose pool processes trace with Celery's instrumentation, into a file."""
    yield from recording_worker(request.param, tmp_path_factory, ENV, "spans.jsonl")


@pytest.fixture
def instrumented() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield provider, exporter
    finally:
        instrumentor.uninstrument()


def request_and_publish_spans(
    exporter: InMemorySpanExporter, request_span: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request's span and Celery's publish span under it, in this process's trace."""
    finished = [span_dict(span) for span in exporter.get_finished_spans()]
    request = next(span for span in finished if span["name"] == "POST /signup")
    publish = next(span for span in finished if span["name"] == f"apply_async/{HANDLER}")
    assert request["span_id"] == f"{request_span.get_span_context().span_id:016x}"
    assert publish["trace_id"] == request["trace_id"]
    assert publish["parent_id"] == request["span_id"]
    return request, publish


def run_span(spans_file: Path, call_id: str) -> dict[str, Any] | None:
    """The worker's run span of the call, once it has written it."""
    return next(
        (
            span
            for span in read_spans(spans_file)
            if span["name"] == f"run/{HANDLER}"
            and span["attributes"].get(tracing.CALL_ID) == call_id
        ),
        None,
    )


def test_the_handler_span_descends_from_the_request_span(
    traced_worker: tuple[Worker, Path],
    instrumented: tuple[TracerProvider, InMemorySpanExporter],
    settings: SettingsWrapper,
) -> None:
    worker, spans_file = traced_worker
    provider, exporter = instrumented
    call_ids: list[str] = []

    def deferred(sender: Any, call_id: str, **kwargs: Any) -> None:
        call_ids.append(call_id)

    signals.call_deferred.connect(deferred, weak=False)
    label = uuid.uuid4().hex
    try:
        tracer = provider.get_tracer("tests")
        with (
            use_app(worker.app, settings, worker.queue),
            tracer.start_as_current_span("POST /signup") as request_span,
            transaction.atomic(),
        ):
            traced_signal.send(sender=None, label=label)
    finally:
        signals.call_deferred.disconnect(deferred)
    (call_id,) = call_ids

    request, publish = request_and_publish_spans(exporter, request_span)
    assert publish["attributes"]["messaging.message.id"] == call_id

    record = wait_for(
        lambda: Record.objects.filter(handler="traced", call__label=label).first(),
        timeout=60,
        what="the traced handler to run on the worker",
    )
    run = wait_for(lambda: run_span(spans_file, call_id), timeout=30, what="the worker's run span")
    print(
        f"\n{worker.broker}: trace {request['trace_id']}\n"
        f"  request span  {request['span_id']} (parent {request['parent_id']})\n"
        f"  publish span  {publish['span_id']} (parent {publish['parent_id']}) "
        f"message id {publish['attributes']['messaging.message.id']}\n"
        f"  run span      {run['span_id']} (parent {run['parent_id']}, pid {run['pid']}) "
        f"call id {run['attributes'][tracing.CALL_ID]}\n"
        f"  handler saw   span {record.call['span_id']} (parent {record.call['parent_id']}) "
        f"in trace {record.call['trace_id']}"
    )
    assert run["trace_id"] == request["trace_id"]
    assert run["parent_id"] == publish["span_id"]
    assert run["attributes"][tracing.HANDLER] == HANDLER
    assert run["attributes"]["messaging.message.id"] == call_id
    # The handler's own code runs inside that span.
    assert record.call["trace_id"] == request["trace_id"]
    assert record.call["span_id"] == run["span_id"]
    assert record.call["parent_id"] == publish["span_id"]
    assert record.call["attributes"][tracing.CALL_ID] == call_id


def test_a_relayed_handler_span_descends_from_the_request_span(
    traced_worker: tuple[Worker, Path],
    instrumented: tuple[TracerProvider, InMemorySpanExporter],
    settings: SettingsWrapper,
) -> None:
    """Spilled while the broker was down, relayed from a span of the relay's own: the
    relay's publish span joins the request's trace (the context kept with the row), and
    the worker's run span descends from it."""
    worker, spans_file = traced_worker
    provider, exporter = instrumented
    label = uuid.uuid4().hex
    tracer = provider.get_tracer("tests")
    with use_app(worker.app, settings, worker.queue):
        with tracer.start_as_current_span("POST /signup") as request_span:
            publisher.cooldown.start(ConnectionError("the broker is down"))
            try:
                with transaction.atomic():
                    traced_signal.send(sender=None, label=label)
            finally:
                publisher.cooldown.clear()
        (row,) = OutboxCall.objects.all()
        assert "traceparent" in row.trace
        with tracer.start_as_current_span("relay round") as relay_span:
            assert Relay(databases=["default"]).run_once() == 1

    request, publish = request_and_publish_spans(exporter, request_span)
    assert relay_span.get_span_context().trace_id != request_span.get_span_context().trace_id
    assert publish["attributes"]["messaging.message.id"] == row.id

    wait_for(
        lambda: Record.objects.filter(handler="traced", call__label=label).first(),
        timeout=60,
        what="the relayed handler to run on the worker",
    )
    run = wait_for(lambda: run_span(spans_file, row.id), timeout=30, what="the worker's run span")
    assert run["trace_id"] == request["trace_id"]
    assert run["parent_id"] == publish["span_id"]


def test_retries_stay_in_the_request_trace_and_a_replay_joins_its_own(
    traced_worker: tuple[Worker, Path],
    instrumented: tuple[TracerProvider, InMemorySpanExporter],
    settings: SettingsWrapper,
) -> None:
    """Each retry's run span descends from the attempt that failed (Celery's retry publishes
    from inside its run span), so a call's every attempt is in its request's trace. A replay
    publishes again from where it runs: the replayed run joins the replay's trace."""
    worker, spans_file = traced_worker
    provider, _ = instrumented
    tracer = provider.get_tracer("tests")
    with use_app(worker.app, settings, worker.queue):
        with tracer.start_as_current_span("POST /signup") as request_span, transaction.atomic():
            flaky_signal.send(sender=None, key=uuid.uuid4().hex, fail_times=4)  # 4 attempts
        letter = wait_for(DeadLetter.objects.first, timeout=60, what="the dead letter")
        with tracer.start_as_current_span("replay") as replay_span:
            assert replay([letter])[0] == [letter]
        wait_for(
            lambda: Record.objects.filter(handler="flaky").exists(),
            timeout=60,
            what="the replayed call to succeed",
        )

    def runs() -> list[dict[str, Any]]:
        found = [
            span
            for span in read_spans(spans_file)
            if span["name"] == f"run/{FLAKY}"
            and span["attributes"].get(tracing.CALL_ID) == letter.call_id
        ]
        return found if len(found) == 5 else []

    spans = wait_for(runs, timeout=30, what="the five run spans")
    by_attempt = {span["attributes"][tracing.ATTEMPT]: span for span in spans[:4]}
    request_trace = f"{request_span.get_span_context().trace_id:032x}"
    assert sorted(by_attempt) == [1, 2, 3, 4]
    assert {span["trace_id"] for span in by_attempt.values()} == {request_trace}
    publishes = {
        span["span_id"]: span
        for span in read_spans(spans_file)
        if span["name"] == f"apply_async/{FLAKY}"
    }
    for attempt in (2, 3, 4):  # run <- the retry's publish <- the failed attempt's run
        retry_publish = publishes[by_attempt[attempt]["parent_id"]]
        assert retry_publish["parent_id"] == by_attempt[attempt - 1]["span_id"]
    replayed = spans[4]
    assert replayed["attributes"][tracing.ATTEMPT] == 1
    assert replayed["trace_id"] == f"{replay_span.get_span_context().trace_id:032x}"
