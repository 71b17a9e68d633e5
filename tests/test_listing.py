"""``manage.py deferred_signals list``: the queue each handler's messages really go to."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from io import StringIO
from typing import Any

import pytest
from celery import current_app
from django.core.management import call_command
from django.test import override_settings

MARKER = "tests.testapp.handlers.marker"


def listing(*args: str) -> tuple[str, dict[str, dict[str, Any]]]:
    text, data = StringIO(), StringIO()
    call_command("deferred_signals", "list", *args, stdout=text)
    call_command("deferred_signals", "list", "--json", *args, stdout=data)
    return text.getvalue(), {entry["name"]: entry for entry in json.loads(data.getvalue())}


@pytest.fixture
def task_routes() -> Iterator[Callable[[Any], None]]:
    app = current_app._get_current_object()
    previous = app.conf.task_routes

    def route(routes: Any) -> None:
        app.conf.task_routes = routes
        app.amqp.flush_routes()
        app.amqp.__dict__.pop("router", None)  # built once from the routes, as Celery caches it

    yield route
    route(previous)


def test_queues_are_resolved_through_the_celery_apps_router(
    task_routes: Callable[[Any], None],
) -> None:
    task_routes({"tests.testapp.handlers.mark*": {"queue": "cache"}, "tests.user_event": "x"})
    handlers = {"tests.user_event": {"queue": "crm"}}
    with override_settings(DEFERRED_SIGNALS={"HANDLERS": handlers}):
        text, entries = listing("--no-workers")
    assert entries[MARKER]["queue"] == entries[MARKER]["options"]["queue"] == "cache"
    assert f"{MARKER}\n  tests.testapp.signals.slow_signal from any sender\n  queue=cache," in text
    assert entries["tests.user_event"]["queue"] == "crm"  # a queue option wins over task_routes
    default = current_app.conf.task_default_queue
    assert entries["tests.testapp.handlers.article_saved"]["queue"] == default
    assert entries[MARKER]["workers"] is None and "consumed by" not in text


def test_workers_are_unknown_when_none_answers() -> None:
    text, entries = listing("--timeout", "0.1")
    assert entries[MARKER]["workers"] == "unknown"
    assert entries[MARKER]["workers_unknown_reason"] == "no worker answered"
    assert "consumed by: unknown (no worker answered)" in text


def test_a_broker_that_is_down_is_not_reported_as_workers_that_do_not_answer() -> None:
    """With Redis stopped, list said "no worker answered", sending the user to their workers
    when the broker was what did not answer."""
    from celery import Celery

    from tests.conftest import current

    down = Celery("down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    with warnings.catch_warnings():  # the new app takes the shared tasks other tests made
        warnings.simplefilter("ignore")
        down.finalize()
    with current(down):
        text, entries = listing("--timeout", "0.1")
    reason = entries[MARKER]["workers_unknown_reason"]
    assert entries[MARKER]["workers"] == "unknown"
    assert reason.startswith("the broker did not answer: OperationalError: ")
    assert f"consumed by: unknown ({reason})" in text and "no worker answered" not in text


def test_renamed_handlers_show_their_former_names() -> None:
    text, entries = listing("--no-workers")
    assert entries["tests.testapp.handlers.renamed"]["aliases"] == [
        "tests.testapp.handlers.old_name"
    ]
    assert "also answers to its former names: tests.testapp.handlers.old_name" in text


def test_the_text_shows_every_option_a_layer_changed() -> None:
    """It showed six options whatever was set: a handler given coalesce=True, or made durable
    with delivery="outbox", listed as any other, and only --json told."""
    handlers = {MARKER: {"delivery": "outbox", "rate_limit": "5/s"}}
    with override_settings(DEFERRED_SIGNALS={"HANDLERS": handlers}):
        text, _ = listing("--no-workers")
    blocks = {block.split("\n")[0]: block for block in text.split("\ntests.")}
    marker = blocks[MARKER.removeprefix("tests.")]
    assert ", instance=fresh, delivery=outbox, rate_limit=5/s" in marker
    row_touched = blocks["testapp.handlers.row_touched"]
    assert ", instance=snapshot, coalesce=True" in row_touched
    # Options at their defaults stay out of the line, as before.
    assert "reject_on_worker_lost=True" not in text and "coalesce=False" not in text


@pytest.mark.parametrize(
    ("dead_letters", "said"),
    [
        (True, "it keeps them as dead letters, to replay once it runs them. Restart"),
        (False, "with DEAD_LETTERS off, they are lost. Restart"),
    ],
)
def test_a_worker_without_the_handler_is_said_to_keep_its_calls_only_when_it_does(
    dead_letters: bool, said: str
) -> None:
    """With DEAD_LETTERS off a worker leaves an unregistered call to Celery, which discards
    it (unregistered.py): "keeps them as dead letters" would send the user to replay none."""
    from django.core.management.base import OutputWrapper
    from django.core.management.color import no_style

    from deferred_signals.listing import handlers_report, print_handlers

    (entry,) = [e for e in handlers_report(workers=False) if e["name"] == MARKER]
    entry.update(workers=["w1@host"], unregistered_on=["w1@host"])  # as `inspect` answers
    text = StringIO()
    with override_settings(DEFERRED_SIGNALS={"DEAD_LETTERS": dead_letters}):
        print_handlers([entry], OutputWrapper(text), no_style())
    line = "  not imported by: w1@host: such a worker does not run this handler's calls: "
    assert line + said in text.getvalue()
