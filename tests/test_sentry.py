"""Sentry's trace, from the request that commits to the handler on a real worker.

sentry-sdk's CeleryIntegration puts its trace headers on a message in its ``apply_async``
wrapper, which our publish path does not call: ``deferred_signals.sentry`` puts the same
ones. Here, the request side records its Sentry events in memory and a real worker appends
its own to a file (tests/sentry_capture.py); nothing is sent anywhere. Checked:

- without a Sentry client (or without its CeleryIntegration, or with its propagation off),
  a message carries no Sentry header at all;
- with one, a message of ours carries the headers ``apply_async`` would put, in the same
  places, under a ``queue.submit.celery`` span of the request's transaction;
- the relay, which publishes long after the request, puts the request's trace, kept with the
  call's outbox row when it was spilled or written, and never its own;
- end to end, on Redis and RabbitMQ: the worker's transaction for the handler continues the
  request's trace, its parent being the submit span opened in the request's transaction.
"""

from __future__ import annotations

import copy
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from celery import Celery
from celery.signals import after_task_publish
from django.db import transaction
from pytest_django.fixtures import Settings as SettingsWrapper
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.django import DjangoIntegration

from deferred_signals import outbox, publisher, registry, signals
from deferred_signals.dispatch import PendingCall
from deferred_signals.messages import MessageBuilder, summary
from deferred_signals.models import OutboxCall
from deferred_signals.relay import Relay
from tests.conftest import current, recording_worker, use_app, wait_for
from tests.sentry_capture import ENV, MemoryTransport, initialised, read_events
from tests.testapp.models import Article, Record
from tests.workers import Worker

pytestmark = pytest.mark.django_db(transaction=True)

HANDLERS = ("tests.testapp.handlers.article_saved", "tests.testapp.handlers.article_snapshot")
#: What CeleryIntegration adds to a message without headers of its own, in its order.
SENTRY_KEYS = ["sentry-task-enqueued-time", "sentry-trace", "baggage", "headers"]
NESTED_KEYS = ["sentry-trace", "baggage", "sentry-task-enqueued-time"]


def sentry_keys(headers: dict[str, Any]) -> list[str]:
    return [key for key in headers if key.startswith("sentry-") or key in ("baggage", "headers")]


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """The headers of every message published in this process, as they went out."""
    seen: list[dict[str, Any]] = []

    def record(sender: Any, headers: dict[str, Any], **kwargs: Any) -> None:
        seen.append(copy.deepcopy(headers))

    after_task_publish.connect(record, weak=False)
    yield seen
    after_task_publish.disconnect(record)


@pytest.fixture
def memory_app(settings: SettingsWrapper) -> Iterator[Celery]:
    """Deferred calls published for real, to kombu's in-process broker: no service needed."""
    app = Celery(f"sentry-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    with use_app(app, settings, f"ds-sentry-{uuid.uuid4().hex[:8]}"):
        yield app


def save_article() -> None:
    with transaction.atomic():
        Article.objects.create(title="traced")


@pytest.mark.parametrize(
    "state", ["not initialised", "no CeleryIntegration", "propagate_traces=False"]
)
def test_without_sentry_propagating_a_message_carries_no_sentry_header(
    memory_app: Celery, published: list[dict[str, Any]], state: str
) -> None:
    integrations = {
        "not initialised": None,
        "no CeleryIntegration": [DjangoIntegration()],
        "propagate_traces=False": [CeleryIntegration(propagate_traces=False)],
    }[state]
    transport = MemoryTransport()
    if integrations is None:
        save_article()
    else:
        with (
            initialised(transport, integrations),
            sentry_sdk.start_transaction(op="http.server", name="POST /articles/"),
        ):
            save_article()
    assert sorted(headers["task"] for headers in published) == sorted(HANDLERS)
    for headers in published:
        assert sentry_keys(headers) == [], headers


def test_a_message_carries_the_headers_apply_async_would_put(
    memory_app: Celery, published: list[dict[str, Any]]
) -> None:
    handler = registry.get(HANDLERS[0])
    assert handler is not None
    body = {"v": 1, "signal": 0, "sender": "testapp.Article", "kwargs": {}}
    # The call takes the lean path, not apply_async (which sentry-sdk wraps itself).
    assert MessageBuilder(memory_app).build(handler.task, "x", body, {}) is not None
    transport = MemoryTransport()
    with (
        initialised(transport, [CeleryIntegration()]),
        sentry_sdk.start_transaction(op="http.server", name="POST /articles/") as request,
    ):
        handler.task.apply_async(
            kwargs=body, task_id=str(uuid.uuid4()), argsrepr="()", kwargsrepr=summary(body)
        )
        save_article()
    celery, *ours = published
    assert len(ours) == 2
    (event,) = transport.transactions()
    spans = {span["span_id"]: span for span in event["spans"]}
    for headers in (celery, *ours):
        assert sentry_keys(headers) == SENTRY_KEYS
        assert list(headers["headers"]) == NESTED_KEYS
        for key in NESTED_KEYS:
            assert headers["headers"][key] == headers[key]
        assert headers["baggage"] == celery["baggage"]
        trace_id, span_id, sampled = headers["sentry-trace"].split("-")
        assert (trace_id, sampled) == (request.trace_id, "1")
        # The span the worker continues from: a submit span of the request's transaction,
        # around the publish span sentry-sdk opens in Producer.publish. (apply_async nests
        # two: sentry-sdk wraps both apply_async and the send_task it calls.)
        submit = spans[span_id]
        assert submit["op"] == "queue.submit.celery"
        assert submit["description"] == headers["task"]
        parent = submit["parent_span_id"]
        if headers is celery:
            assert spans[parent]["op"] == "queue.submit.celery"
            parent = spans[parent]["parent_span_id"]
        assert parent == request.span_id
        (publish,) = [span for span in spans.values() if span.get("parent_span_id") == span_id]
        assert publish["op"] == "queue.publish"
        assert publish["data"]["messaging.message.id"] == headers["id"]


@pytest.mark.parametrize("in_span", [True, False], ids=["in a span", "outside spans"])
def test_span_streaming_mode_propagates_its_trace_too(
    memory_app: Celery, published: list[dict[str, Any]], in_span: bool
) -> None:
    """sentry-sdk's newer mode, where spans are sent as they end (``trace_lifecycle``)."""
    with initialised(MemoryTransport(), [CeleryIntegration()], trace_lifecycle="stream"):
        if in_span:
            with sentry_sdk.traces.start_span(name="POST /articles/") as request:
                save_article()
            trace_id = request.trace_id
        else:
            save_article()
            trace_id = sentry_sdk.get_traceparent().split("-")[0]
    assert len(published) == 2
    for headers in published:
        assert sentry_keys(headers) == SENTRY_KEYS
        trace, span_id = headers["sentry-trace"].split("-")[:2]
        assert trace == trace_id
        if in_span:  # a submit span of its own, under the request's
            assert span_id != request.span_id


def test_the_relay_publishes_without_the_trace_of_its_own_process(
    memory_app: Celery, published: list[dict[str, Any]]
) -> None:
    """A relayed call's request is long gone: the relay's trace is not the handler's."""
    handler = registry.get(HANDLERS[0])
    assert handler is not None
    body = {"v": 1, "signal": 0, "sender": "testapp.Article", "kwargs": {}}
    outbox.spill([PendingCall(handler, str(uuid.uuid4()), body)], "default", None)
    with (
        initialised(MemoryTransport(), [CeleryIntegration()]),
        sentry_sdk.start_transaction(op="task", name="relay"),
    ):
        assert Relay(databases=["default"]).run_once() == 1
    (headers,) = published
    assert sentry_keys(headers) == []


def spill_in_request(transport: MemoryTransport) -> Any:
    """Save an article in a traced request while the broker is down (the cooldown): its two
    calls are left in the outbox (spilled right after the commit, or, with
    ``DELIVERY="outbox"``, written in the transaction). Returns the request's transaction."""
    with (
        initialised(transport, [CeleryIntegration()]),
        sentry_sdk.start_transaction(op="http.server", name="POST /articles/") as request,
    ):
        publisher.cooldown.start(ConnectionError("the broker is down"))
        try:
            save_article()
        finally:
            publisher.cooldown.clear()
    return request


@pytest.mark.parametrize("delivery", ["on_commit", "outbox"])
def test_a_spilled_call_is_relayed_in_the_trace_of_its_request(
    memory_app: Celery,
    published: list[dict[str, Any]],
    settings: SettingsWrapper,
    delivery: str,
) -> None:
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "DELIVERY": delivery}
    request = spill_in_request(MemoryTransport())
    assert published == []  # nothing went out: both calls wait in the outbox
    rows = list(OutboxCall.objects.all())
    assert sorted(row.handler for row in rows) == sorted(HANDLERS)
    for row in rows:
        kept = json.loads(row.trace)["sentry"]
        assert kept["sentry-trace"].split("-")[:2] == [request.trace_id, request.span_id]
        assert "sentry-trace_id=" + request.trace_id in kept["baggage"]
    # The relay, in a trace of its own that its handlers must not join.
    with (
        initialised(MemoryTransport(), [CeleryIntegration()]),
        sentry_sdk.start_transaction(op="task", name="relay") as relay,
    ):
        assert Relay(databases=["default"]).run_once() == 2
    assert sorted(headers["task"] for headers in published) == sorted(HANDLERS)
    for headers in published:
        assert sentry_keys(headers) == SENTRY_KEYS
        assert list(headers["headers"]) == NESTED_KEYS
        for key in NESTED_KEYS:
            assert headers["headers"][key] == headers[key]
        trace_id, span_id, sampled = headers["sentry-trace"].split("-")
        assert relay.trace_id != request.trace_id
        assert (trace_id, span_id, sampled) == (request.trace_id, request.span_id, "1")
    assert not OutboxCall.objects.exists()


def test_a_relay_without_sentry_still_writes_the_kept_trace(
    memory_app: Celery, published: list[dict[str, Any]]
) -> None:
    request = spill_in_request(MemoryTransport())
    assert Relay(databases=["default"]).run_once() == 2  # no Sentry client in the relay
    assert len(published) == 2
    for headers in published:
        assert sentry_keys(headers) == SENTRY_KEYS
        assert headers["sentry-trace"].startswith(f"{request.trace_id}-{request.span_id}")


def spill_broker_down(action: Any = None) -> None:
    """Save an article (or run ``action``) while the broker cools down: the calls spill."""
    publisher.cooldown.start(ConnectionError("the broker is down"))
    try:
        (action or save_article)()
    finally:
        publisher.cooldown.clear()


@pytest.mark.parametrize("relay_traced", [True, False], ids=["Sentry in the relay", "none"])
def test_a_relayed_call_on_celerys_per_call_path_keeps_its_trace(
    memory_app: Celery, published: list[dict[str, Any]], relay_traced: bool
) -> None:
    """apply_async (here for task_send_sent_event): sentry-sdk's wrapper would write the
    relay's trace; the kept one is written over it."""
    request = spill_in_request(MemoryTransport())
    memory_app.conf.task_send_sent_event = True
    try:
        if relay_traced:
            with (
                initialised(MemoryTransport(), [CeleryIntegration()]),
                sentry_sdk.start_transaction(op="task", name="relay") as relay,
            ):
                assert Relay(databases=["default"]).run_once() == 2
            assert relay.trace_id != request.trace_id
        else:
            assert Relay(databases=["default"]).run_once() == 2
    finally:
        memory_app.conf.task_send_sent_event = False
    assert len(published) == 2
    for headers in published:
        assert headers["sentry-trace"].startswith(f"{request.trace_id}-{request.span_id}")
        assert headers["headers"]["sentry-trace"] == headers["sentry-trace"]
        assert "sentry-trace_id=" + request.trace_id in headers["baggage"]
    # Connected only while such a call is published: the lean path's templates stay on.
    from celery.signals import before_task_publish

    assert not [r for r in before_task_publish.receivers if "propagation" in str(r[0])]


def test_span_streaming_mode_keeps_the_request_spans_trace(
    memory_app: Celery, published: list[dict[str, Any]]
) -> None:
    with (
        initialised(MemoryTransport(), [CeleryIntegration()], trace_lifecycle="stream"),
        sentry_sdk.traces.start_span(name="POST /articles/") as request,
    ):
        spill_broker_down()
    (row, _) = OutboxCall.objects.all()
    kept = json.loads(row.trace)["sentry"]["sentry-trace"]
    assert kept.split("-")[:2] == [request.trace_id, request.span_id]
    assert Relay(databases=["default"]).run_once() == 2
    for headers in published:
        assert headers["sentry-trace"].split("-")[:2] == [request.trace_id, request.span_id]


def test_a_relay_batch_mixing_traced_and_untraced_rows(
    memory_app: Celery, published: list[dict[str, Any]]
) -> None:
    spill_broker_down()  # no Sentry: rows without a trace
    request = spill_in_request(MemoryTransport())
    assert Relay(databases=["default"]).run_once() == 4
    traced = [headers for headers in published if "sentry-trace" in headers]
    untraced = [headers for headers in published if "sentry-trace" not in headers]
    assert len(traced) == len(untraced) == 2
    for headers in traced:
        assert headers["sentry-trace"].startswith(request.trace_id)
    for headers in untraced:
        assert sentry_keys(headers) == []


def test_both_tracers_keep_their_trace_and_share_one_baggage(
    memory_app: Celery, published: list[dict[str, Any]]
) -> None:
    from opentelemetry import baggage, context
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("tests")
    with (
        initialised(MemoryTransport(), [CeleryIntegration()]),
        sentry_sdk.start_transaction(op="http.server", name="POST /articles/") as request,
        tracer.start_as_current_span("POST /articles/") as span,
    ):
        token = context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            spill_broker_down()
        finally:
            context.detach(token)
    kept = json.loads(OutboxCall.objects.first().trace)  # type: ignore[union-attr]
    assert sorted(kept) == ["otel", "sentry"]
    assert Relay(databases=["default"]).run_once() == 2
    traceparent = (
        f"00-{span.get_span_context().trace_id:032x}-{span.get_span_context().span_id:016x}"
    )
    for headers in published:
        assert headers["traceparent"].startswith(traceparent)
        assert headers["sentry-trace"].startswith(request.trace_id)
        items = headers["baggage"].split(",")
        assert "tenant=acme" in items
        assert f"sentry-trace_id={request.trace_id}" in items
        assert headers["headers"]["baggage"] == headers["baggage"]


def test_without_sentry_in_the_request_a_row_keeps_no_trace(memory_app: Celery) -> None:
    publisher.cooldown.start(ConnectionError("the broker is down"))
    try:
        save_article()
    finally:
        publisher.cooldown.clear()
    assert [row.trace for row in OutboxCall.objects.all()] == ["", ""]


# --- end to end -----------------------------------------------------------------------------


def publish_to(worker: Worker, settings: SettingsWrapper) -> None:
    """Deferred calls go to ``worker``'s queue, for real (not EAGER)."""
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "EAGER": False,
        "DEFAULTS": {"queue": worker.queue},
    }


def handler_transactions(events_file: Path, call_ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The worker's transaction for each handler's call, among those it has written so far."""
    found = {
        event["tags"].get("celery_task_id"): event
        for event in read_events(events_file)
        if event.get("type") == "transaction"
    }
    return {name: found[id] for name, id in call_ids.items() if id in found}


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def sentry_worker(
    request: pytest.FixtureRequest, django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Worker, Path]]:
    """A real worker with Sentry's CeleryIntegration, writing its events to a file."""
    yield from recording_worker(request.param, tmp_path_factory, ENV, "events.jsonl")


@pytest.mark.worker
def test_the_handler_transaction_continues_the_request_trace(
    sentry_worker: tuple[Worker, Path], settings: SettingsWrapper
) -> None:
    worker, events_file = sentry_worker
    publish_to(worker, settings)
    call_ids: dict[str, str] = {}

    def deferred(sender: Any, handler: str, call_id: str, **kwargs: Any) -> None:
        call_ids[handler] = call_id

    transport = MemoryTransport()
    signals.call_deferred.connect(deferred, weak=False)
    try:
        with (
            current(worker.app),
            initialised(transport, [CeleryIntegration(), DjangoIntegration()]),
            sentry_sdk.start_transaction(op="http.server", name="POST /articles/") as request,
        ):
            save_article()
    finally:
        signals.call_deferred.disconnect(deferred)
    assert sorted(call_ids) == sorted(HANDLERS)
    (event,) = transport.transactions()
    submits = {
        span["description"]: span for span in event["spans"] if span["op"] == "queue.submit.celery"
    }
    assert sorted(submits) == sorted(HANDLERS)

    wait_for(
        lambda: (
            Record.objects.filter(handler__in=["article_saved", "article_snapshot"]).count() == 2
        ),
        timeout=60,
        what="both handlers to run on the worker",
    )

    ran = wait_for(
        lambda: (
            (found := handler_transactions(events_file, call_ids)) and len(found) == 2 and found
        ),
        timeout=30,
        what="the worker's transactions",
    )
    print(f"\n{worker.broker}: trace {request.trace_id}, request span {request.span_id}")
    for name, run in ran.items():
        trace = run["contexts"]["trace"]
        print(
            f"  {name}: submit span {submits[name]['span_id']} -> worker transaction "
            f"{trace['span_id']} (parent {trace.get('parent_span_id')}, pid {run['pid']})"
        )
        assert run["transaction"] == name
        assert trace["op"] == "queue.task.celery"
        assert trace["trace_id"] == request.trace_id
        assert trace["parent_span_id"] == submits[name]["span_id"]
        assert submits[name]["parent_span_id"] == request.span_id
        # The worker side read the enqueue time we put: its latency is on the process span.
        (process,) = [span for span in run["spans"] if span["op"] == "queue.process"]
        assert process["data"]["messaging.message.id"] == call_ids[name]
        assert process["data"]["messaging.message.receive.latency"] >= 0


@pytest.mark.worker
def test_a_relayed_handler_transaction_continues_the_request_trace(
    sentry_worker: tuple[Worker, Path], settings: SettingsWrapper
) -> None:
    """Spilled while the broker was down, relayed later from a trace of the relay's own:
    the worker's transactions continue the request's trace, from the request's span."""
    worker, events_file = sentry_worker
    publish_to(worker, settings)
    call_ids: dict[str, str] = {}

    def spilled(sender: Any, handler: str, call_id: str, **kwargs: Any) -> None:
        call_ids[handler] = call_id

    signals.call_spilled.connect(spilled, weak=False)
    try:
        with current(worker.app):
            request = spill_in_request(MemoryTransport())
            assert sorted(call_ids) == sorted(HANDLERS)
            with (
                initialised(MemoryTransport(), [CeleryIntegration()]),
                sentry_sdk.start_transaction(op="task", name="relay") as relay,
            ):
                assert Relay(databases=["default"]).run_once() == 2
    finally:
        signals.call_spilled.disconnect(spilled)

    ran = wait_for(
        lambda: (
            (found := handler_transactions(events_file, call_ids)) and len(found) == 2 and found
        ),
        timeout=60,
        what="the worker's transactions for the relayed calls",
    )
    print(f"\n{worker.broker}: request trace {request.trace_id}, relay trace {relay.trace_id}")
    for name, run in ran.items():
        trace = run["contexts"]["trace"]
        print(f"  {name}: worker transaction {trace['span_id']} in trace {trace['trace_id']}")
        assert trace["op"] == "queue.task.celery"
        assert trace["trace_id"] == request.trace_id != relay.trace_id
        assert trace["parent_span_id"] == request.span_id


def test_an_sdk_that_fails_leaves_publishing_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from deferred_signals import sentry

    broken = types.ModuleType("sentry_sdk")

    def get_client() -> Any:
        raise AttributeError("an SDK whose API moved")

    broken.get_client = get_client  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sentry_sdk", broken)

    def publish(*args: Any, **kwargs: Any) -> None: ...

    assert sentry.publishing(publish) is publish


@pytest.mark.worker
def test_retries_continue_the_request_trace_and_a_replay_its_own(
    sentry_worker: tuple[Worker, Path], settings: SettingsWrapper
) -> None:
    """Celery retries through apply_async, which sentry-sdk traces from the failed attempt's
    transaction: every attempt is in the request's trace. A replay publishes in the trace of
    what replays (docs: "Which trace a call continues")."""
    from deferred_signals.models import DeadLetter
    from deferred_signals.replay import replay
    from tests.testapp.signals import flaky_signal

    worker, events_file = sentry_worker
    publish_to(worker, settings)
    transport = MemoryTransport()
    with current(worker.app), initialised(transport, [CeleryIntegration(), DjangoIntegration()]):
        with (
            sentry_sdk.start_transaction(op="http.server", name="POST /articles/") as request,
            transaction.atomic(),
        ):
            flaky_signal.send(sender=None, key=uuid.uuid4().hex, fail_times=4)
        letter = wait_for(DeadLetter.objects.first, timeout=60, what="the dead letter")
        with sentry_sdk.start_transaction(op="task", name="replay") as replaying:
            assert replay([letter])[0] == [letter]

    def runs() -> list[dict[str, Any]]:
        found = [
            event["contexts"]["trace"]
            for event in read_events(events_file)
            if event.get("type") == "transaction"
            and event["tags"].get("celery_task_id") == letter.call_id
        ]
        return found if len(found) == 5 else []

    traces = wait_for(runs, timeout=60, what="the five attempts' transactions")
    assert [trace["trace_id"] for trace in traces] == [request.trace_id] * 4 + [replaying.trace_id]
