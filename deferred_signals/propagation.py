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

Nothing here imports sentry-sdk or OpenTelemetry: a process that never imported them keeps
"" for each row, for two dictionary lookups.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
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
    otel = kept.get(OTEL)
    sentry_headers = kept.get(SENTRY)
    if otel or sentry_headers:
        message.layout = None  # its headers change: a Redis push encodes them as they are
    if otel:
        # Where OpenTelemetry's worker side reads them; an instrumented relay writes its
        # own publish span's over them, a child of this context (below).
        message.headers.update(
            {key: value for key, value in otel.items() if not (sentry_headers and key == "baggage")}
        )
    if sentry_headers:
        message.headers.update(sentry.message_headers(sentry_headers))
    token = _attach(otel) if otel else None
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
