"""Shared fixtures: services on 127.0.0.1, test handlers' records, real worker processes."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings

from tests.testapp import handlers
from tests.testapp.models import Record

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

SERVICES = {
    "postgres": (5432, "PostgreSQL", "make services (or: pg_ctlcluster <version> main start)"),
    "redis": (6379, "Redis", "make services (or: redis-server --daemonize yes)"),
    "rabbitmq": (5672, "RabbitMQ", "make services (or: rabbitmq-server -detached)"),
}


def service_up(name: str) -> bool:
    port = SERVICES[name][0]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def require(name: str) -> None:
    """Skip when a service is absent, with how to start it; under CI=true, fail instead."""
    if service_up(name):
        return
    port, label, how = SERVICES[name]
    message = f"{label} is not reachable on 127.0.0.1:{port}; start it with: {how}"
    if CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def on_postgres() -> bool:
    return bool(settings.DATABASES["default"]["ENGINE"].endswith("postgresql"))


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    # Runs before pytest-django creates the test databases.
    if on_postgres():
        require("postgres")


@pytest.fixture
def postgres_only() -> None:
    if not on_postgres():
        pytest.skip("PostgreSQL-only: runs in make test's PostgreSQL pass (--ds=tests.settings_postgres)")


@pytest.fixture(autouse=True)
def _clear_sync_calls() -> Iterator[None]:
    handlers.SYNC.clear()
    yield
    handlers.SYNC.clear()


def records(handler: str | None = None) -> list[Record]:
    queryset = Record.objects.order_by("id")
    if handler is not None:
        queryset = queryset.filter(handler=handler)
    return list(queryset)


def sync_calls(handler: str) -> list[dict[str, Any]]:
    return [call["call"] for call in handlers.SYNC if call["handler"] == handler]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
