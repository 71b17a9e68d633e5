"""The docs' Prometheus example (docs/how-to/monitoring.md), run as written, with the real
prometheus_client."""

from __future__ import annotations

import re
import types
from collections.abc import Iterator
from typing import Any

import pytest
from celery import current_app
from django.db import transaction
from prometheus_client import REGISTRY
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import signals
from tests.conftest import use_app
from tests.testapp.signals import flaky_signal, user_registered
from tests.workers import ROOT, make_app

pytestmark = pytest.mark.django_db(transaction=True)

USER_EVENT = "tests.user_event"
FLAKY = "tests.testapp.handlers.flaky"


EXAMPLE_PAGE = "docs/how-to/monitoring.md"


def docs_example() -> str:
    page = (ROOT / EXAMPLE_PAGE).read_text()
    found = re.search(
        r"<!-- prometheus-example -->\n```python\n(.*?)```\n<!-- /prometheus-example -->",
        page,
        re.DOTALL,
    )
    assert found, f"the Prometheus example of {EXAMPLE_PAGE} is gone"
    return found.group(1)


@pytest.fixture(scope="module")
def metrics() -> Iterator[types.ModuleType]:
    """The example as the module ``metrics.apps``, its AppConfig's ready() run (once: its
    metrics live in prometheus_client's global registry)."""
    module = types.ModuleType("metrics.apps")
    exec(compile(docs_example(), f"{EXAMPLE_PAGE} (prometheus example)", "exec"), module.__dict__)
    config = module.MetricsConfig.__new__(module.MetricsConfig)  # no app module to point at
    config.ready()
    yield module
    receivers = [value for name, value in vars(module).items() if name.startswith("on_")]
    for name in signals.__all__:
        for receiver in receivers:
            getattr(signals, name).disconnect(receiver)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_docs_example_counts_per_handler(
    metrics: types.ModuleType, settings: SettingsWrapper
) -> None:
    before: dict[str, Any] = {
        "deferred": value("deferred_calls_deferred_total", handler=USER_EVENT),
        "published": value("deferred_calls_published_total", handler=USER_EVENT),
        "spilled": value("deferred_calls_spilled_total", handler=USER_EVENT),
        "succeeded": value("deferred_handler_succeeded_total", handler=USER_EVENT),
        "latency": value("deferred_handler_start_latency_seconds_count", handler=USER_EVENT),
        "retried": value("deferred_handler_retried_total", handler=FLAKY, database="false"),
        "failed": value("deferred_handler_failed_total", handler=FLAKY),
        "dead": value("deferred_calls_dead_lettered_total", handler=FLAKY),
    }
    with transaction.atomic():  # EAGER: runs at commit
        user_registered.send(sender=None, n=1)
    with transaction.atomic():  # EAGER, failing: final at once
        flaky_signal.send(sender=None, key="eager", fail_times=1)
    # A worker's run: three retries, then a failure for good and a dead letter.
    message = {"v": 1, "signal": 0, "sender": None, "kwargs": {"key": "k", "fail_times": 9}}
    current_app.tasks[FLAKY].apply(kwargs=message, task_id="prometheus-1")
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "EAGER": False}
    with transaction.atomic():  # to the in-memory broker
        user_registered.send(sender=None, n=2)
    down = make_app("down", "redis://127.0.0.1:1/0")
    with use_app(down, settings, "ds-down"), transaction.atomic():
        user_registered.send(sender=None, n=3)

    def delta(key: str, name: str, **labels: str) -> float:
        return value(name, **labels) - before[key]

    assert delta("deferred", "deferred_calls_deferred_total", handler=USER_EVENT) == 3
    assert delta("published", "deferred_calls_published_total", handler=USER_EVENT) == 1
    assert delta("spilled", "deferred_calls_spilled_total", handler=USER_EVENT) == 1
    assert delta("succeeded", "deferred_handler_succeeded_total", handler=USER_EVENT) == 1
    assert delta("latency", "deferred_handler_start_latency_seconds_count", handler=USER_EVENT) == 1
    assert delta("retried", "deferred_handler_retried_total", handler=FLAKY, database="false") == 3
    assert delta("failed", "deferred_handler_failed_total", handler=FLAKY) == 2  # EAGER + worker
    assert delta("dead", "deferred_calls_dead_lettered_total", handler=FLAKY) == 1
    assert value("deferred_handler_start_latency_seconds_sum", handler=USER_EVENT) >= 0
