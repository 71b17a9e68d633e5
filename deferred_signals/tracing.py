"""Our attributes on the running handler's span, when OpenTelemetry is installed.

The span itself, and its parent in the request that committed the call, come from
OpenTelemetry's Celery instrumentation: it injects the trace context into each message's
headers on ``before_task_publish`` (our publish path fires it as Celery does) and opens the
handler's span from them on ``task_prerun``. This package depends on none of it.
"""

from __future__ import annotations

from typing import Any

trace: Any
try:
    from opentelemetry import trace
except ImportError:  # pragma: no cover - OpenTelemetry is optional
    trace = None

#: Span attributes we set on the handler's span.
CALL_ID = "deferred_signals.call_id"
HANDLER = "deferred_signals.handler"
ATTEMPT = "deferred_signals.attempt"


def annotate(handler: str, call_id: str, attempt: int) -> None:
    """Name the call on the current span (the handler's, under Celery's instrumentation)."""
    if trace is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({CALL_ID: call_id, HANDLER: handler, ATTEMPT: attempt})
