"""Sentry's trace headers on the messages we build, as its Celery integration writes them.

sentry-sdk's ``CeleryIntegration`` links a task's transaction on the worker to the trace
that sent it by wrapping ``Task.apply_async`` and ``Celery.send_task``: around each call it
opens a ``queue.submit.celery`` span and puts ``sentry-trace``, ``baggage`` and
``sentry-task-enqueued-time`` in the message headers, and in their nested ``headers`` dict,
which is where its worker side reads them. Our lean publish path calls neither, so
:func:`publishing` does the same around each message it publishes: same span, same headers,
in the same place, from the SDK's public API. The worker side is sentry-sdk's own.

Nothing here imports sentry-sdk: a process that never imported it, or whose client has no
``CeleryIntegration`` (not initialised, or ``propagate_traces=False``), publishes through
:func:`~deferred_signals.producer.publish_message` itself, checked once per batch.

The relay publishes calls long after, and far from, the requests that made them: it
publishes :func:`detached`, without headers of its own process's trace (which would make
all of them join the relay's one ambient trace); a call whose outbox row kept its request's
trace (:func:`captured`, :mod:`propagation`) gets that one's headers instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kombu import Producer

    from .messages import Message

    Publish = Callable[..., None]

logger = logging.getLogger("deferred_signals")

#: What sentry-sdk's Celery integration calls its submit span and its spans' origin.
SUBMIT_OP = "queue.submit.celery"
ORIGIN = "auto.queue.celery"
TRACE_HEADER = "sentry-trace"
BAGGAGE_HEADER = "baggage"
ENQUEUED_HEADER = "sentry-task-enqueued-time"
MONITOR_HEADER = "sentry-monitor-start-timestamp-s"

_detached: ContextVar[bool] = ContextVar("deferred_signals_sentry_detached", default=False)


@contextlib.contextmanager
def detached() -> Iterator[None]:
    """Publish without Sentry's trace headers in this block (the relay)."""
    token = _detached.set(True)
    try:
        yield
    finally:
        _detached.reset(token)


def publishing(publish: Publish) -> Publish:
    """``publish`` (``publish_message``), traced as sentry-sdk traces ``apply_async`` when a
    Sentry client with ``CeleryIntegration`` propagates traces here; else ``publish`` itself.

    Call it once per batch: the traced function reads the SDK's state for each message.
    """
    sdk = sys.modules.get("sentry_sdk")
    if sdk is None or _detached.get():
        return publish
    try:
        return _publishing(publish, sdk)
    except Exception:  # an SDK we do not know: tracing must never stop a publish
        logger.debug("deferred_signals: Sentry tracing is off for this batch", exc_info=True)
        return publish


def _publishing(publish: Publish, sdk: Any) -> Publish:
    state = _propagating(sdk)
    if state is None:
        return publish
    return partial(_traced, publish, sdk, *state)


def _propagating(sdk: Any) -> tuple[bool, bool] | None:
    """``(span streaming, monitor_beat_tasks)`` when a Sentry client with ``CeleryIntegration``
    propagates traces here; None when not."""
    client = sdk.get_client()
    integration = client.get_integration("celery")
    if (
        integration is None
        or not getattr(integration, "propagate_traces", True)
        # The deprecated client option: the SDK then sends no trace headers at all.
        or not client.options.get("propagate_traces", True)
    ):
        return None
    streaming = getattr(sdk, "tracing_utils", None)
    is_streaming = getattr(streaming, "has_span_streaming_enabled", None)
    return (
        bool(is_streaming and is_streaming(client.options)),
        bool(getattr(integration, "monitor_beat_tasks", False)),
    )


def _traced(
    publish: Publish,
    sdk: Any,
    streaming: bool,
    monitor_beat_tasks: bool,
    producer: Producer,
    message: Message,
    **kwargs: Any,
) -> None:
    with _submit_span(sdk, streaming, message.task) as span:
        message.layout = None  # the headers change: a Redis push encodes them as they are
        try:
            message.headers.update(headers(sdk, span, monitor_beat_tasks))
        except Exception:  # tracing never stops a publish (sentry-sdk swallows these too)
            logger.debug("deferred_signals: Sentry's trace headers failed", exc_info=True)
        publish(producer, message, **kwargs)


def _submit_span(sdk: Any, streaming: bool, task: str) -> Any:
    """The span sentry-sdk opens around ``apply_async``, or a stand-in when it opens none."""
    try:
        if not streaming:
            return sdk.start_span(op=SUBMIT_OP, name=task, origin=ORIGIN)
        traces = sdk.traces
        if traces.get_current_span() is not None:
            return traces.start_span(
                name=task, attributes={"sentry.op": SUBMIT_OP, "sentry.origin": ORIGIN}
            )
    except Exception:
        logger.debug("deferred_signals: Sentry's submit span failed", exc_info=True)
    return contextlib.nullcontext()


def headers(sdk: Any, span: Any, monitor_beat_tasks: bool = False) -> dict[str, Any]:
    """The headers sentry-sdk's ``apply_async`` wrapper adds to a message without headers
    of its own, keys in its order; ``span`` is the submit span (the scope's when None)."""
    propagated = dict(sdk.get_isolation_scope().iter_trace_propagation_headers(span=span))
    if monitor_beat_tasks:
        propagated[MONITOR_HEADER] = f"{time.time():.9f}"
    return message_headers(propagated)


def captured() -> dict[str, str] | None:
    """The trace to continue, as ``sentry-trace`` and ``baggage``, when a Sentry client with
    ``CeleryIntegration`` propagates traces here (what a message published now would carry,
    from the current span); None otherwise. Kept with an outbox row, for the relay
    (:mod:`propagation`)."""
    sdk = sys.modules.get("sentry_sdk")
    if sdk is None:
        return None
    try:
        state = _propagating(sdk)
        if state is None:
            return None  # no CeleryIntegration, or propagation off
        # The span-streaming mode keeps its spans apart from the scope's.
        span = sdk.traces.get_current_span() if state[0] else sdk.get_current_span()
        propagated = sdk.get_isolation_scope().iter_trace_propagation_headers(span=span)
        found = {key: value for key, value in propagated if key in (TRACE_HEADER, BAGGAGE_HEADER)}
    except Exception:  # tracing never stops a write
        logger.debug("deferred_signals: Sentry's trace could not be read", exc_info=True)
        return None
    return found if TRACE_HEADER in found else None


def message_headers(propagated: dict[str, Any]) -> dict[str, Any]:
    """The headers of a message continuing the trace of ``propagated`` (``sentry-trace``,
    ``baggage``), where sentry-sdk's ``apply_async`` wrapper puts them, keys in its order."""
    added: dict[str, Any] = {ENQUEUED_HEADER: time.time()}
    if not propagated:
        return added
    added.update(propagated)
    # Celery hands the worker's task the nested dict as its request's headers (celery#4875):
    # that is where sentry-sdk's worker side looks for the trace.
    nested = dict(propagated)
    for key, value in added.items():
        if key.startswith("sentry-"):
            nested[key] = value
    added["headers"] = nested
    return added
