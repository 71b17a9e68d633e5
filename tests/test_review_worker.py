"""Review findings on the worker side, end to end on a real prefork worker (Redis)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kombu import Exchange, Queue

from tests.conftest import records, wait_for
from tests.testapp.models import Article
from tests.workers import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

USER_EVENT = "tests.user_event"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_deep_message_properties_do_not_stop_the_worker(deferred_to: Worker) -> None:
    """Redis carries message properties as JSON: Celery copies them into the request it
    pickles for a prefork child, so they must be bounded like headers and body."""
    if deferred_to.broker != "redis":
        pytest.skip("AMQP properties are a fixed set of scalar fields")
    task_id = str(uuid.uuid4())
    marker = uuid.uuid4().hex[:12]
    headers = {
        "lang": "py", "task": USER_EVENT, "id": task_id, "root_id": task_id, "parent_id": None,
        "group": None, "retries": 0, "timelimit": [None, None], "eta": None, "expires": None,
        "argsrepr": "()", "kwargsrepr": "{}", "origin": "tests", "ignore_result": True,
    }  # fmt: skip
    body = [
        [],
        {"v": 1, "signal": 0, "sender": None, "kwargs": {"label": marker}},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    queue = Queue(deferred_to.queue, Exchange(deferred_to.queue), routing_key=deferred_to.queue)
    with deferred_to.app.connection_for_write() as connection:
        connection.Producer().publish(
            body,
            exchange=queue.exchange,
            routing_key=deferred_to.queue,
            headers=headers,
            declare=[queue],
            serializer="json",
            x_deep=nested(800),  # an extra property: kombu's Redis envelope keeps it
        )
    assert_survived(deferred_to, marker, "the deep-properties message")


def test_bad_stamped_headers_do_not_stop_the_worker(deferred_to: Worker) -> None:
    """With an ``expires`` header, Celery's main process iterates ``stamped_headers``
    (Request.revoked) before the pool: a number there raises TypeError in the consumer."""
    from tests.test_worker_faults import call, publish_raw

    marker = uuid.uuid4().hex[:12]
    publish_raw(
        deferred_to,
        USER_EVENT,
        call(None, label=marker),
        headers={"expires": "2999-01-01T00:00:00+00:00", "stamped_headers": 5},
    )
    assert_survived(deferred_to, marker, "the bad stamped_headers message")


def assert_survived(worker: Worker, marker: str, what: str) -> None:
    """A good call after the bad message runs, and the worker is still up."""
    title = f"{marker}-after"
    Article.objects.create(title=title)
    wait_for(
        lambda: [r for r in records("article_saved") if title in str(r.call)] or not worker.alive(),
        timeout=60,
        what=f"a good call after {what}",
    )
    alive, log = worker.alive(), worker.log()
    if not alive:
        worker.start()  # leave a live worker for the other tests of the session
    assert "Unrecoverable error" not in log[-20000:]
    assert alive
