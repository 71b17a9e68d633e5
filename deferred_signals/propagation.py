"""The trace a call was made in, kept with its outbox row, for the relay to continue.

A call published right after its commit continues the request's trace by itself: Sentry's
headers (:mod:`sentry`) and OpenTelemetry's Celery instrumentation are written as the
message goes out, in the request. A call the relay publishes, spilled after a broker failure
or left in the outbox by a crash, goes out long after and far from its request. So when its
row is written (in the request: ``DELIVERY="outbox"``, or the spill right after the commit)
the trace context of that moment is kept with it, in ``OutboxCall.trace``:

- Sentry's ``sentry-trace`` and ``baggage``, when a Sentry client with ``CeleryIntegration``
  propagates traces in the request's process;
- OpenTelemetry's propagation headers (W3C ``traceparent``, ``tracestate``), when a span is
  current there.

The relay writes them into the message, where sentry-sdk's and OpenTelemetry's worker sides
read them, and publishes with that OpenTelemetry context current, so an instrumented relay's
publish span joins the request's trace rather than the relay's. The handler's transaction
or span then continues the request's trace, as if published at once; a row kept without a
trace (neither tracer in the request, or written before this column existed) is published
with none, and its handler starts a trace of its own.

Nothing here imports sentry-sdk or OpenTelemetry: a process that imported neither keeps ""
for each row, for two dictionary lookups; with OpenTelemetry installed (this package's
:mod:`tracing` imports its API) but no span current, about a microsecond more.

A call the relay sends through Celery's per-call path (``apply_async``: a routing function,
a handler that stores results, ``task_send_sent_event``) gets the same headers, from a
``before_task_publish`` receiver connected only while it is published, after sentry-sdk's
``apply_async`` wrapper (which would write the relay's trace) and OpenTelemetry's receiver.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import sentry

if TYPE_CHECKING:
    from .messages import Message

logger = logging.getLogger("deferred_signals")

SENTRY = "sentry"
OTEL = "otel"


def capture() -> str:
    """The current trace context as text for an outbox row: "" when nothing traces here."""
    kept: dict[str, dict[str, str]] = {}
    found = sentry.captured()
    if found:
        kept[SENTRY] = found
    found = _otel_captured()
    if found:
        kept[OTEL] = found
    return json.dumps(kept, separators=(",", ":")) if kept else ""


def _otel_captured() -> dict[str, str] | None:
    if "opentelemetry.trace" not in sys.modules:
        return None  # never imported: no span can be current
    try:
        from opentelemetry import propagate, trace

        if not trace.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    except Exception:  # tracing never stops a write
        logger.debug("deferred_signals: OpenTelemetry's context could not be read", exc_info=True)
        return None
    return carrier or None


def parse(text: str) -> dict[str, dict[str, str]]:
    """What :func:`capture` kept; {} for "" or anything it did not write."""
    if not text:
        return {}
    try:
        kept = json.loads(text)
    except ValueError:
        return {}
    if type(kept) is not dict:
        return {}
    return {
        name: {str(key): value for key, value in headers.items() if type(value) is str}
        for name, headers in kept.items()
        if name in (SENTRY, OTEL) and type(headers) is dict
    }


@contextlib.contextmanager
def continued(text: str, message: Message) -> Iterator[None]:
    """Publish ``message`` (a relayed call's) in the trace ``text`` kept (:func:`capture`)."""
    kept = parse(text)
    if not kept:
        yield
        return
    message.layout = None  # its headers change: a Redis push encodes them as they are
    apply(message.headers, kept)
    with _otel_context(kept.get(OTEL)):
        yield


@contextlib.contextmanager
def continued_per_call(text: str, call_id: str) -> Iterator[None]:
    """Publish call ``call_id`` through ``apply_async`` in the trace ``text`` kept."""
    kept = parse(text)
    if not kept:
        yield
        return
    token = _per_call.set((call_id, kept))
    _receiving(True)
    try:
        with _otel_context(kept.get(OTEL)):
            yield
    finally:
        _receiving(False)
        _per_call.reset(token)


def apply(headers: dict[str, Any], kept: dict[str, dict[str, str]]) -> None:
    """Write the kept trace into a message's ``headers``: OpenTelemetry's where its worker
    side reads them (unless a publish span of the relay's put its own, a child of the kept
    context), Sentry's where sentry-sdk's worker side reads them, over any the relay's own
    Sentry put; one ``baggage``, Sentry's with the other items, as sentry-sdk merges them."""
    otel = kept.get(OTEL) or {}
    for key, value in otel.items():
        headers.setdefault(key, value)
    found = kept.get(SENTRY)
    if not found:
        return
    added = sentry.message_headers(found)
    other = otel.get(BAGGAGE)
    if other and BAGGAGE in found:
        added[BAGGAGE] = added["headers"][BAGGAGE] = _merged_baggage(found[BAGGAGE], other)
    nested = added.pop("headers", None)
    headers.update(added)
    if nested is not None:
        inner = headers.get("headers")
        if type(inner) is dict:
            inner.update(nested)
        else:
            headers["headers"] = nested


BAGGAGE = "baggage"


def _merged_baggage(sentry_baggage: str, other: str) -> str:
    """Sentry's ``baggage`` with the other tracer's items that are not Sentry's."""
    items = [item.strip() for item in sentry_baggage.split(",") if item.strip()]
    items += [
        item.strip()
        for item in other.split(",")
        if item.strip() and not item.strip().startswith("sentry-")
    ]
    return ",".join(items)


#: The relayed call published through apply_async now, and its kept trace.
_per_call: contextvars.ContextVar[tuple[str, dict[str, dict[str, str]]] | None] = (
    contextvars.ContextVar("deferred_signals_per_call_trace", default=None)
)
_receivers_lock = threading.Lock()
_receivers = 0


def _receiving(on: bool) -> None:
    """Connect :func:`_before_publish` while at least one relayed call needs it: connected
    for good, every publish would lose the Redis templates (a receiver may change headers)."""
    global _receivers
    from celery.signals import before_task_publish

    with _receivers_lock:
        _receivers += 1 if on else -1
        if on and _receivers == 1:
            before_task_publish.connect(_before_publish, weak=False, dispatch_uid=__name__)
        elif not on and _receivers == 0:
            before_task_publish.disconnect(_before_publish, dispatch_uid=__name__)


def _before_publish(sender: Any = None, headers: Any = None, **kwargs: Any) -> None:
    current = _per_call.get()
    if current is None or type(headers) is not dict or headers.get("id") != current[0]:
        return
    try:
        apply(headers, current[1])
    except Exception:  # tracing never stops a publish
        logger.debug("deferred_signals: the kept trace could not be written", exc_info=True)


@contextlib.contextmanager
def _otel_context(carrier: dict[str, str] | None) -> Iterator[None]:
    """The kept OpenTelemetry context current for the block, for an instrumented relay's
    publish span to be its child (not the relay's own span's)."""
    token = _attach(carrier) if carrier else None
    try:
        yield
    finally:
        if token is not None:
            _detach(token)


def _attach(carrier: dict[str, str]) -> Any:
    if "opentelemetry.context" not in sys.modules and "opentelemetry.trace" not in sys.modules:
        return None  # nothing in this process would read the context
    try:
        from opentelemetry import context, propagate

        return context.attach(propagate.extract(carrier))
    except Exception:
        logger.debug("deferred_signals: OpenTelemetry's context could not be set", exc_info=True)
        return None


def _detach(token: Any) -> None:
    try:
        from opentelemetry import context

        context.detach(token)
    except Exception:
        logger.debug("deferred_signals: OpenTelemetry's context could not be reset", exc_info=True)
