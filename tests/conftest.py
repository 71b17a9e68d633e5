"""Shared fixtures: services on 127.0.0.1, test handlers' records, real worker processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from celery import Celery, current_app
from celery import _state as celery_state
from django.conf import settings
from pytest_django.fixtures import Settings as SettingsWrapper

import tests.celery_app  # noqa: F401  (the project's Celery app is current, as in a project)
from deferred_signals import publisher, signals
from tests.private_redis import PrivateRedis
from tests.testapp import handlers
from tests.testapp.models import Record
from tests.workers import PUBLISH_REDIS_URL, Worker, make_app

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


def missing(message: str) -> NoReturn:
    """Skip with ``message``, which says how to get what is missing; under CI=true, fail."""
    if CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def require(name: str) -> None:
    """Skip when a service is absent, with how to start it; under CI=true, fail instead."""
    if service_up(name):
        return
    port, label, how = SERVICES[name]
    missing(f"{label} is not reachable on 127.0.0.1:{port}; start it with: {how}")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    """``private_redis(*arguments)``: a started redis-server of the test's own (arguments
    for ``redis-server``), stopped after the test (:mod:`tests.private_redis`)."""
    if shutil.which("redis-server") is None:
        missing("no redis-server binary here; install it with: apt-get install redis-server")
    started: list[PrivateRedis] = []

    def start(*arguments: str) -> PrivateRedis:
        server = PrivateRedis(tmp_path, *arguments)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def on_postgres() -> bool:
    return bool(settings.DATABASES["default"]["ENGINE"].endswith("postgresql"))


def recording_worker(
    broker: str, tmp_path_factory: pytest.TempPathFactory, env: str, filename: str
) -> Iterator[tuple[Worker, Path]]:
    """For a module-scoped fixture: a real worker on ``broker`` that records into a file (its
    path in the environment variable ``env``), for the PostgreSQL pass's end-to-end tests."""
    if not on_postgres():
        pytest.skip(
            "end-to-end: runs in make test's PostgreSQL pass (--ds=tests.settings_postgres)"
        )
    require(broker)
    from django.db import connections

    names = {alias: connections[alias].settings_dict["NAME"] for alias in ("default", "other")}
    directory = tmp_path_factory.mktemp(filename.split(".")[0])
    path = directory / filename
    worker = Worker(broker, names, directory, env={env: str(path)})
    worker.start()
    yield worker, path
    worker.stop()
    worker.delete_queue()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    # Runs before pytest-django creates the test databases.
    if on_postgres():
        require("postgres")


@pytest.fixture
def postgres_only() -> None:
    if not on_postgres():
        pytest.skip(
            "PostgreSQL-only: runs in make test's PostgreSQL pass (--ds=tests.settings_postgres)"
        )


@pytest.fixture(autouse=True)
def _clear_sync_calls() -> Iterator[None]:
    handlers.SYNC.clear()
    yield
    handlers.SYNC.clear()


@pytest.fixture(autouse=True)
def _fresh_publisher() -> Iterator[None]:
    """No broker connection or cooldown carried from one test to the next."""
    publisher.reset()
    yield
    publisher.reset()


class Interrupted(BaseException):
    """What gevent's ``Timeout`` is: a ``BaseException``, so that ``except Exception`` lets
    it through."""


@pytest.fixture
def call_ids() -> Iterator[list[str]]:
    """The id of each deferred call, in send order, as the package's own signal tells it."""
    seen: list[str] = []

    def deferred(sender: Any, handler: str, call_id: str, **kwargs: Any) -> None:
        seen.append(call_id)

    signals.call_deferred.connect(deferred, weak=False)
    yield seen
    signals.call_deferred.disconnect(deferred)


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


@pytest.fixture(scope="session", params=["redis", "rabbitmq"])
def worker(
    request: pytest.FixtureRequest, django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """A real ``celery worker`` process on Redis, then on RabbitMQ, using the test databases."""
    if not on_postgres():
        pytest.skip(
            "end-to-end: runs in make test's PostgreSQL pass (--ds=tests.settings_postgres)"
        )
    require(request.param)
    from django.db import connections

    names = {alias: connections[alias].settings_dict["NAME"] for alias in ("default", "other")}
    started = Worker(request.param, names, tmp_path_factory.mktemp("workers"))
    started.start()
    yield started
    started.stop()
    started.delete_queue()


@pytest.fixture
def deferred_to(worker: Worker, settings: SettingsWrapper) -> Iterator[Worker]:
    """Publish deferred calls to ``worker``'s broker and queue instead of running them inline."""
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "EAGER": False,
        "DEFAULTS": {"queue": worker.queue},
    }
    previous = current_app._get_current_object()
    previous_default = celery_state.default_app
    worker.app.set_current()
    worker.app.set_default()  # threads other than this one use the default app
    yield worker
    previous.set_current()
    celery_state.set_default_app(previous_default)


@dataclass
class Queue:
    app: Celery
    name: str
    redis: Any

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in reversed(self.redis.lrange(self.name, 0, -1))]

    def __len__(self) -> int:
        return int(self.redis.llen(self.name))


@contextmanager
def current(app: Celery) -> Iterator[None]:
    """Make ``app`` Celery's current and default app (this thread and others), then restore."""
    previous, previous_default = current_app._get_current_object(), celery_state.default_app
    app.set_current()
    app.set_default()
    try:
        yield
    finally:
        previous.set_current()
        celery_state.set_default_app(previous_default)


@contextmanager
def use_app(app: Celery, settings: SettingsWrapper, queue: str) -> Iterator[None]:
    """Publish deferred calls through ``app`` (this thread and others) to ``queue``."""
    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "EAGER": False,
        "DEFAULTS": {"queue": queue},
    }
    try:
        with current(app):
            yield
    finally:
        app.close()


@pytest.fixture
def redis_queue(settings: SettingsWrapper) -> Iterator[Queue]:
    require("redis")
    import redis

    url = PUBLISH_REDIS_URL
    app = make_app("publish-tests", url)
    queue = Queue(app, f"ds-publish-{uuid.uuid4().hex[:8]}", redis.Redis.from_url(url))
    with use_app(app, settings, queue.name):
        yield queue
    queue.redis.delete(queue.name)


def at_once(action: Callable[[], Any], count: int) -> list[Any]:
    """``action()`` in ``count`` threads that start together, each with database connections
    of its own (closed after): real concurrency on the test database. Returns each result."""
    from django.db import connections

    start = threading.Barrier(count)
    results: list[Any] = []

    def run() -> None:
        try:
            start.wait(timeout=30)
            results.append(action())
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == count, "a thread failed or did not finish: see its traceback above"
    return results
