"""OpenTelemetry for the tracing tests: in this process, and in a real worker's children.

A worker started with ``DS_TEST_OTEL_SPANS=<path>`` (read by tests/celery_app.py) sets up
Celery's instrumentation in each pool process, as OpenTelemetry's docs say to, and appends
every span it finishes to that file, one JSON object a line, for the test to read.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

ENV = "DS_TEST_OTEL_SPANS"


def span_dict(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


class FileExporter(SpanExporter):
    """Appends finished spans to a file (each line in one write: pool processes share it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_dict(span), default=str) + "\n" for span in spans)
        with self.lock, self.path.open("a") as file:
            file.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trace_worker_to(path: str) -> None:
    """Called at import of the worker's Celery app: instrument each pool process."""

    @worker_process_init.connect(weak=False)
    def instrument(**kwargs: Any) -> None:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(FileExporter(Path(path))))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument(tracer_provider=provider)
