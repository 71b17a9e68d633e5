"""Sentry for the tracing tests: a client whose envelopes never leave the machine.

The DSN names 127.0.0.1 only because sentry-sdk wants one: the transports here record
envelopes in memory (the test process) or append their events to a file (a real worker
started with ``DS_TEST_SENTRY_EVENTS=<path>``, read by tests/celery_app.py), one JSON object
a line, for the test to read. No HTTP transport is ever built.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations import Integration
from sentry_sdk.transport import Transport

ENV = "DS_TEST_SENTRY_EVENTS"
#: A DSN on loopback, for the SDK's parsing: the transports below send nothing anywhere.
DSN = "http://public@127.0.0.1:9/1"


def events(envelope: Envelope) -> list[dict[str, Any]]:
    """The events (errors and transactions) an envelope holds."""
    found = []
    for item in envelope.items:
        if item.type in ("event", "transaction") and item.payload.json is not None:
            found.append(item.payload.json)
    return found


class MemoryTransport(Transport):
    """Keeps every event of this process in a list."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.events.extend(events(envelope))

    def transactions(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("type") == "transaction"]


class FileTransport(Transport):
    """Appends each event to a file, in one write (a worker's pool processes share it)."""

    def __init__(self, path: Path, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.path = path
        self.lock = threading.Lock()

    def capture_envelope(self, envelope: Envelope) -> None:
        lines = "".join(
            json.dumps({**event, "pid": os.getpid()}, default=str) + "\n"
            for event in events(envelope)
        )
        if lines:
            with self.lock, self.path.open("a") as file:
                file.write(lines)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def init(transport: Transport, integrations: list[Integration], **options: Any) -> None:
    """Sentry as a project sets it up, with only ``integrations`` and every trace sampled."""
    sentry_sdk.init(
        dsn=DSN,
        transport=transport,
        traces_sample_rate=1.0,
        integrations=integrations,
        default_integrations=False,
        auto_enabling_integrations=False,
        **options,
    )


@contextmanager
def initialised(
    transport: Transport, integrations: list[Integration], **options: Any
) -> Iterator[None]:
    """Sentry on in this process for the block; then no client, as before.

    The integrations' patches stay (sentry-sdk installs them once per process), but each
    patched function does nothing more when the client lacks its integration.
    """
    init(transport, integrations, **options)
    try:
        yield
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


def report_worker_to(path: str) -> None:
    """Called at import of the worker's Celery app, in the worker's main process, before
    it forks its pool (as Sentry's docs say): every pool process inherits the client."""
    from sentry_sdk.integrations.celery import CeleryIntegration

    init(FileTransport(Path(path)), [CeleryIntegration()])
