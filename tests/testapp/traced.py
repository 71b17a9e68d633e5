"""A deferred handler that says which span it runs in (the tracing tests)."""

from __future__ import annotations

import os
import time
from typing import Any

from django.dispatch import Signal

from deferred_signals import receiver

from .models import Record

traced_signal = Signal()


@receiver(traced_signal, defer=True)
def traced(signal: Signal, sender: Any, label: str, **kwargs: Any) -> None:
    from opentelemetry import trace

    span = trace.get_current_span()
    context = span.get_span_context()
    parent = getattr(span, "parent", None)
    Record.objects.create(
        handler="traced",
        call={
            "label": label,
            "trace_id": f"{context.trace_id:032x}",
            "span_id": f"{context.span_id:016x}",
            "parent_id": None if parent is None else f"{parent.span_id:016x}",
            "attributes": {k: str(v) for k, v in (getattr(span, "attributes", None) or {}).items()},
        },
        pid=os.getpid(),
        ran_at=time.time(),
    )
