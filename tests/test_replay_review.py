"""Review of the replay claim (e1f334a, 5df6bf1): each test fails on that code."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connection, transaction
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals.models import DeadLetter
from deferred_signals.outbox import body_text
from tests.conftest import Queue, use_app
from tests.test_operations import command, dead_letter, outbox_table_gone, published
from tests.workers import make_app

FLAKY = "tests.testapp.handlers.flaky"


def flaky_letter(key: str) -> DeadLetter:
    body = {"v": 1, "signal": 0, "sender": None, "kwargs": {"key": key, "fail_times": 99}}
    body["at"] = time.time()
    return DeadLetter.objects.create(
        call_id=str(uuid.uuid4()),
        handler=FLAKY,
        body=body_text(body),
        exception="tests.testapp.handlers.FlakyError",
        message="attempt 4",
        traceback="Traceback ...",
        attempts=4,
    )


@pytest.mark.django_db(transaction=True)
def test_a_claim_that_fails_midway_leaves_no_letter_marked_but_unpublished(
    postgres_only: None, redis_queue: Queue
) -> None:
    """The second letter's claim UPDATE fails (its row locked by another transaction past
    lock_timeout, as with a statement_timeout in OPTIONS; or the database dropping): the
    first letter, claimed (committed) already, must not stay marked replayed unpublished."""
    first, second = dead_letter("first"), dead_letter("second")
    settings = connection.settings_dict
    locker = psycopg.connect(
        host=settings["HOST"], port=settings["PORT"], user=settings["USER"],
        dbname=settings["NAME"], autocommit=False,
    )  # fmt: skip
    try:
        locker.execute(
            f"SELECT 1 FROM {DeadLetter._meta.db_table} WHERE id = %s FOR UPDATE", [second.pk]
        )
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '300ms'")
        try:
            out, err = command("replay", "--all")
        except OperationalError:
            out = err = "raised"
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
    finally:
        locker.rollback()
        locker.close()
    first.refresh_from_db()
    sent = [task_id for task_id, _ in published(redis_queue)]
    # Marked replayed <=> published (the broker has it).
    assert (first.replayed_at is not None) == (first.call_id in sent), (out, err, sent)
    # And nothing is lost for good: a later replay --all publishes every letter.
    command("replay", "--all")
    sent = [task_id for task_id, _ in published(redis_queue)]
    assert sorted(set(sent)) == sorted([first.call_id, second.call_id]), sent


@pytest.mark.django_db
def test_a_replay_inside_an_atomic_block_of_a_testcase_is_captured(deferred: Any) -> None:
    """Under TestCase (pytest-django's db), the capture counts a deferred call when the
    test's outermost atomic block exits: a replay made there is claimed, so it must count."""
    from deferred_signals.replay import replay

    letter = dead_letter("captured")
    with transaction.atomic():
        replayed, skipped = replay(DeadLetter.objects.all())
    assert replayed == [letter] and not skipped
    assert DeadLetter.objects.get().replayed_at is not None  # claimed, in the test's tx
    assert [call.id for call in deferred.calls] == [letter.call_id]


@pytest.mark.django_db(transaction=True)
def test_eager_propagates_a_replay_at_commit_raises_the_handlers_error(
    settings: SettingsWrapper,
) -> None:
    """EAGER + EAGER_PROPAGATES: a replayed handler's exception at commit reaches the test,
    as every deferred call's does, not an AttributeError from Django's robust on_commit
    logging ``functools.partial.__qualname__``; and the letter, failed again without a dead
    letter, is not left marked replayed."""
    from deferred_signals.replay import replay
    from tests.testapp.handlers import FlakyError

    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "EAGER_PROPAGATES": True}
    flaky_letter("eager-commit")
    with pytest.raises(FlakyError), transaction.atomic():
        replay(DeadLetter.objects.all())
    assert DeadLetter.objects.get().replayed_at is None


@pytest.mark.django_db(transaction=True)
def test_celery_eager_propagates_a_replay_at_commit_raises_the_handlers_error(
    settings: SettingsWrapper,
) -> None:
    """Celery's ``task_always_eager`` + ``task_eager_propagates`` (a project's test settings):
    a replay at commit whose handler fails again raises the handler's error into the test, as
    a deferred call's does, not Django's robust on_commit logging an AttributeError."""
    from deferred_signals.replay import replay
    from tests.testapp.handlers import FlakyError

    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        "HANDLERS": {FLAKY: {"max_retries": 0}},  # fails for good at once
    }
    app = make_app("replay-celery-eager", "redis://127.0.0.1:1/0")  # nothing listens
    with use_app(app, settings, "nowhere"):
        app.conf.task_always_eager = True
        app.conf.task_eager_propagates = True
        flaky_letter("celery-eager-commit")
        with pytest.raises(FlakyError), transaction.atomic():
            replay(DeadLetter.objects.all())


@pytest.mark.django_db(transaction=True)
def test_eager_propagates_a_replay_whose_handler_raises_is_not_left_marked(
    settings: SettingsWrapper,
) -> None:
    """Before the claim, the handler's exception left the letter unmarked (as for a lost
    call): it failed again, nothing recorded it, it is still to be replayed."""
    from deferred_signals.replay import replay
    from tests.testapp.handlers import FlakyError

    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "EAGER_PROPAGATES": True}
    flaky_letter("eager-now")
    with pytest.raises(FlakyError):
        replay(DeadLetter.objects.all())
    assert DeadLetter.objects.get().replayed_at is None


@pytest.mark.django_db
def test_the_admin_replay_under_atomic_requests_in_a_testcase_is_captured(
    deferred: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project's own test of its admin (TestCase, ATOMIC_REQUESTS): the request's atomic
    block exits, the capture counts what it deferred; the replayed call included."""
    from django.contrib.auth.models import User
    from django.test import Client

    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    letter = dead_letter("admin in a TestCase")
    client = Client()
    client.force_login(User.objects.create_superuser("admin", password="pw"))
    response = client.post(
        "/admin/deferred_signals/deadletter/",
        {"action": "replay_selected", "_selected_action": [letter.pk]},
        follow=True,
    )
    assert "Replayed 1 dead letter(s)" in response.content.decode()
    assert [call.id for call in deferred.calls] == [letter.call_id]


@pytest.mark.django_db(transaction=True)
def test_two_operators_replaying_from_pages_loaded_before_either_publish_once(
    redis_queue: Queue,
) -> None:
    """Both see the letter not replayed and click Replay, seconds apart: the action reads
    the selection at the click, after the first replay's claim, so the claim (as read)
    passed and the call was published twice, both told "Replayed 1"."""
    from django.contrib.auth.models import User
    from django.test import Client

    letter = dead_letter("two operators")
    clients = []
    for name in ("alice", "bob"):
        client = Client()
        client.force_login(User.objects.create_superuser(name, password="pw"))
        page = client.get("/admin/deferred_signals/deadletter/?replayed_at__isempty=1")
        assert letter.call_id in page.content.decode()
        clients.append(client)
    pages = [
        client.post(
            "/admin/deferred_signals/deadletter/",
            {"action": "replay_selected", "_selected_action": [letter.pk]},
            follow=True,
        ).content.decode()
        for client in clients
    ]
    assert "Replayed 1 dead letter(s)" in pages[0]
    assert (
        "Replayed 1 dead letter" not in pages[1]
        and f"Skipped {letter.call_id}: replayed already" in pages[1]
    )
    assert [task_id for task_id, _ in published(redis_queue)] == [letter.call_id]


@pytest.mark.django_db(transaction=True)
def test_a_letter_whose_outbox_row_cannot_be_written_is_not_marked(
    postgres_only: None, settings: SettingsWrapper
) -> None:
    """Broker and outbox both fail: the claim commits with the call's outbox row or not at
    all, so the letter is not left marked replayed with its call lost (before, the un-mark
    that followed could fail too, and the letter read as replayed)."""
    letter = dead_letter("unmark")
    down = make_app("down", "redis://127.0.0.1:1/0")
    with use_app(down, settings, "nowhere"), outbox_table_gone():
        out, err = command("replay", "--all")
    assert "replayed 0 dead letter(s), skipped 1" in out
    assert f"skipped {letter.id}" in err and "still a dead letter" in err
    assert DeadLetter.objects.get().replayed_at is None
