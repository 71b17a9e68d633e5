"""Operating durable delivery: the relay, replay, status, prune, the admin and check W010.

Publishing goes to a real Redis list nobody consumes, so the test reads exactly what was sent.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection, connections, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import publisher, signals
from deferred_signals.checks import check_outbox_tables
from deferred_signals.models import DeadLetter, OutboxCall, ProcessedCall, RelayHeartbeat
from deferred_signals.outbox import body_text
from deferred_signals.relay import Relay
from deferred_signals.schema import settings_problems
from tests.conftest import Queue, at_once, use_app
from tests.workers import PUBLISH_REDIS_URL, ROOT, make_app

pytestmark = pytest.mark.django_db(transaction=True)

EVENT = "tests.user_event"


SECOND = datetime.timedelta(seconds=1)


def body(label: str) -> dict[str, Any]:
    return {"v": 1, "signal": 0, "sender": None, "kwargs": {"label": label}, "at": time.time()}


def dead_letter(label: str, handler: str = EVENT) -> DeadLetter:
    return DeadLetter.objects.create(
        call_id=str(uuid.uuid4()),
        handler=handler,
        body=body_text(body(label)),
        exception="tests.testapp.handlers.FlakyError",
        message="attempt 4",
        traceback="Traceback ...",
        attempts=4,
    )


def published(queue: Queue) -> list[tuple[str, dict[str, Any]]]:
    """(task id, our body) of each message in the queue, oldest first."""
    return [
        (m["headers"]["id"], json.loads(base64.b64decode(m["body"]))[1]) for m in queue.messages()
    ]


def command(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("deferred_signals", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


# --- replay --------------------------------------------------------------------------------


def test_replay_publishes_the_same_message_with_the_same_call_id(redis_queue: Queue) -> None:
    letters = [dead_letter("a"), dead_letter("b")]
    out, _ = command("replay", str(letters[0].id), letters[1].call_id)
    assert "replayed 2 dead letter(s), skipped 0" in out
    sent = published(redis_queue)
    assert [task_id for task_id, _ in sent] == [letter.call_id for letter in letters]
    assert [b["kwargs"]["label"] for _, b in sent] == ["a", "b"]
    assert all(letter.replayed_at for letter in DeadLetter.objects.all())
    # Replayed letters are left out of --all unless asked for.
    out, _ = command("replay", "--all")
    assert "replayed 0 dead letter(s)" in out and len(redis_queue) == 2


def test_a_letter_whose_replay_fails_again_is_a_live_dead_letter_again(
    redis_queue: Queue,
) -> None:
    """The worker records the replayed call's new failure on the same row: until it is
    replayed again, status counts it, replay --all takes it and prune keeps it."""
    from deferred_signals import deadletters

    letter = dead_letter("again")
    command("replay", "--all")
    assert DeadLetter.objects.get().replayed_at is not None
    assert deadletters.record(
        call_id=letter.call_id,
        handler=EVENT,
        body=body("again"),
        exception=RuntimeError("still broken"),
        attempts=5,
    )
    failed_again = DeadLetter.objects.get()
    assert failed_again.replayed_at is None and failed_again.attempts == 5
    assert json.loads(command("status", "--json")[0])["dead_letters"] == {EVENT: 1}
    DeadLetter.objects.update(last_failed_at=timezone.now() - datetime.timedelta(days=30))
    command("prune", "--older-than", "1s")
    assert DeadLetter.objects.exists()
    out, _ = command("replay", "--all")
    assert "replayed 1 dead letter(s)" in out
    assert [task_id for task_id, _ in published(redis_queue)] == [letter.call_id] * 2


def test_replay_marks_letters_on_the_write_database_with_a_read_replica(
    postgres_only: None, redis_queue: Queue
) -> None:
    """With Django's primary/replica router the letters are read from the replica: marking
    them replayed there failed after the publish (a traceback, the letter still unreplayed,
    so published again by the next replay --all)."""
    letter = dead_letter("replica")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings_postgres",
        "DS_TEST_DB_DEFAULT": connection.settings_dict["NAME"],
        "DS_TEST_EAGER": "0",
        "DS_TEST_BROKER": PUBLISH_REDIS_URL,
        "DS_TEST_QUEUE": redis_queue.name,
        "DS_TEST_REPLICA": "1",
    }
    replay = subprocess.run(
        [sys.executable, "tests/manage.py", "deferred_signals", "replay", str(letter.id)],
        cwd=ROOT, env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr.decode()
    assert "replayed 1 dead letter(s), skipped 0" in replay.stdout.decode()
    assert [task_id for task_id, _ in published(redis_queue)] == [letter.call_id]
    assert DeadLetter.objects.get().replayed_at is not None


def test_replay_by_handler_all_and_dry_run(redis_queue: Queue) -> None:
    dead_letter("x")
    dead_letter("y", handler="tests.testapp.handlers.marker")
    out, _ = command("replay", "--all", "--dry-run")
    assert out.count("would replay") == 3 and len(redis_queue) == 0
    assert not DeadLetter.objects.exclude(replayed_at=None).exists()
    command("replay", "--handler", "tests.testapp.handlers.marker")
    assert [b["kwargs"]["label"] for _, b in published(redis_queue)] == ["y"]


def test_handler_and_all_leave_out_letters_replayed_before_even_with_ids(
    redis_queue: Queue,
) -> None:
    """--handler and --all win over IDS, with their own rule: replayed letters stay out."""
    replayed_before, fresh = dead_letter("before"), dead_letter("fresh")
    DeadLetter.objects.filter(pk=replayed_before.pk).update(replayed_at=timezone.now())
    out, _ = command("replay", str(replayed_before.id), "--handler", EVENT)
    assert "replayed 1 dead letter(s)" in out and f"replayed {fresh.id}:" in out
    out, _ = command("replay", replayed_before.call_id, "--all", "--dry-run")
    assert "would replay 0 dead letter(s)" in out
    out, _ = command("replay", str(replayed_before.id), "--all", "--include-replayed")
    assert "replayed 2 dead letter(s)" in out
    labels = [b["kwargs"]["label"] for _, b in published(redis_queue)]
    assert labels == ["fresh", "before", "fresh"]


def test_replay_names_the_ids_it_cannot_find_and_replays_nothing(redis_queue: Queue) -> None:
    letter = dead_letter("found")
    with pytest.raises(CommandError) as raised:
        command("replay", str(letter.id), "nope", "99999999999999999999999", "0")
    assert str(raised.value) == (
        "No dead letter has the id or call id 'nope', '99999999999999999999999', '0': "
        "nothing replayed."
    )
    assert len(redis_queue) == 0 and DeadLetter.objects.get().replayed_at is None
    out, _ = command("replay", f"00{letter.id}", letter.call_id)  # both name the one letter
    assert "replayed 1 dead letter(s)" in out


def test_replay_names_a_handler_it_does_not_know(redis_queue: Queue) -> None:
    """A typo in --handler, like one in IDS, must not pass for "nothing to replay"."""
    dead_letter("x")
    with pytest.raises(CommandError, match=r"'tests\.user_evnt'"):
        command("replay", "--handler", "tests.user_evnt")
    assert len(redis_queue) == 0
    # A registered handler without letters to replay is nothing to do, not a mistake;
    # letters of a handler this process does not know are named, and skipped.
    out, _ = command("replay", "--handler", "tests.testapp.handlers.marker")
    assert "replayed 0 dead letter(s), skipped 0" in out
    dead_letter("gone", handler="shop.removed_handler")
    out, err = command("replay", "--handler", "shop.removed_handler")
    assert "replayed 0 dead letter(s), skipped 1" in out and "removed_handler" in err


def test_replay_skips_what_this_code_could_not_have_sent(redis_queue: Queue) -> None:
    unknown = dead_letter("z", handler="gone.handler")
    forged = DeadLetter.objects.create(
        call_id="f", handler=EVENT, body='"just a string"', exception="x"
    )
    out, err = command("replay", "--all")
    assert "replayed 0 dead letter(s), skipped 2" in out
    assert f"skipped {unknown.id}: gone.handler" in err and "no deferred handler" in err
    assert f"skipped {forged.id}" in err and "not one this package sends" in err
    assert len(redis_queue) == 0


def test_a_letter_that_does_not_decode_is_skipped_and_the_others_replayed(
    redis_queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    # What the worker keeps of a refused message that did not decode: its raw text, here
    # nested past what the JSON decoder can take (RecursionError, not ValueError).
    deep = DeadLetter.objects.create(
        call_id="deep", handler=EVENT, body="[" * 100_000 + "]" * 100_000, exception="x"
    )
    broken = DeadLetter.objects.create(call_id="broken", handler=EVENT, body="{", exception="x")
    listed = DeadLetter.objects.create(
        call_id="listed", handler=EVENT, body=body_text({**body("l"), "kwargs": []}), exception="x"
    )
    good = dead_letter("good")
    out, err = command("replay", "--all")
    assert "replayed 1 dead letter(s), skipped 3" in out
    assert f"skipped {listed.id}: {EVENT} [listed]: its message is not one this package" in err
    assert f"skipped {deep.id}: {EVENT} [deep]: its message does not decode (RecursionError)" in err
    assert f"skipped {broken.id}: {EVENT} [broken]: its message does not decode" in err
    assert f"did not replay dead letter {deep.id}" in caplog.text
    assert [task_id for task_id, _ in published(redis_queue)] == [good.call_id]
    assert list(DeadLetter.objects.exclude(replayed_at=None).values_list("call_id", flat=True)) == [
        good.call_id
    ]


def test_replay_with_the_broker_down_goes_to_the_outbox(settings: SettingsWrapper) -> None:
    letter = dead_letter("later")
    with use_app(make_app("down", "redis://127.0.0.1:1/0"), settings, "nowhere"):
        command("replay", "--all")
    (row,) = OutboxCall.objects.all()
    assert row.id == letter.call_id and json.loads(row.body)["kwargs"]["label"] == "later"


def test_replaying_again_while_the_broker_is_down_keeps_every_call(
    settings: SettingsWrapper, caplog: pytest.LogCaptureFixture
) -> None:
    """The first replay spilled A; replaying A and B spills both: A's row stands for A (its
    call id is taken), B gets its own, nothing is lost and both are marked replayed."""
    first, second = dead_letter("first"), dead_letter("second")
    with use_app(make_app("down", "redis://127.0.0.1:1/0"), settings, "nowhere"):
        command("replay", first.call_id)
        publisher.reset()  # no cooldown: the second replay tries the broker again
        out, err = command("replay", first.call_id, second.call_id)
    assert "replayed 2 dead letter(s), skipped 0" in out and not err
    assert "LOST" not in caplog.text
    assert sorted(OutboxCall.objects.values_list("id", flat=True)) == sorted(
        [first.call_id, second.call_id]
    )
    assert not DeadLetter.objects.filter(replayed_at=None).exists()


@contextmanager
def outbox_table_gone() -> Iterator[None]:
    """The outbox table renamed away for the block, outside any transaction: every write to
    the outbox fails, as with a database that refuses it."""
    table = OutboxCall._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_gone")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table}_gone RENAME TO {table}")


def test_a_replay_neither_the_broker_nor_the_outbox_took_is_not_marked_replayed(
    settings: SettingsWrapper,
) -> None:
    letter = dead_letter("lost")
    down = make_app("down", "redis://127.0.0.1:1/0")
    with use_app(down, settings, "nowhere"), outbox_table_gone():
        out, err = command("replay", "--all")
    assert "replayed 0 dead letter(s), skipped 1" in out
    assert f"skipped {letter.id}" in err and "still a dead letter" in err
    assert DeadLetter.objects.get().replayed_at is None


def test_two_replays_of_the_same_letters_publish_each_letter_once(redis_queue: Queue) -> None:
    """Two operators (or the admin and the command) read the same letters before either
    replays: the later replay skips what the earlier one claimed, and says why."""
    from deferred_signals.replay import TAKEN, replay

    for n in range(5):
        dead_letter(f"twice {n}")
    first_read = list(DeadLetter.objects.order_by("id"))
    second_read = list(DeadLetter.objects.order_by("id"))
    replayed, skipped = replay(first_read)
    assert len(replayed) == 5 and not skipped
    replayed, skipped = replay(second_read)
    assert not replayed and [skip.reason for skip in skipped] == [TAKEN] * 5
    assert sorted(task_id for task_id, _ in published(redis_queue)) == sorted(
        letter.call_id for letter in first_read
    )


def test_replays_racing_in_threads_publish_each_letter_once(redis_queue: Queue) -> None:
    """Real concurrency: four threads, each with its own database connection, read the same
    letters, wait for each other, then replay them all at once."""
    from deferred_signals.replay import replay

    letters = [dead_letter(f"race {n}") for n in range(40)]
    reads = iter([list(DeadLetter.objects.order_by("?")) for _ in range(4)])
    counts = at_once(lambda: len(replay(next(reads))[0]), 4)
    assert sum(counts) == 40
    sent = [task_id for task_id, _ in published(redis_queue)]
    assert sorted(sent) == sorted(letter.call_id for letter in letters)


def test_a_replay_inside_a_transaction_publishes_at_its_commit_never_on_rollback(
    redis_queue: Queue,
) -> None:
    """The admin under ATOMIC_REQUESTS: the claim is the request's, and so is the publish."""
    from deferred_signals.replay import replay

    letter = dead_letter("atomic")
    with transaction.atomic():
        replayed, _ = replay(DeadLetter.objects.all())
        assert replayed == [letter] and len(redis_queue) == 0
        transaction.set_rollback(True)
    assert len(redis_queue) == 0 and DeadLetter.objects.get().replayed_at is None

    with transaction.atomic():
        replay(DeadLetter.objects.all())
        assert len(redis_queue) == 0
    ((task_id, _),) = published(redis_queue)
    assert task_id == letter.call_id and DeadLetter.objects.get().replayed_at is not None


def test_a_replay_in_a_transaction_whose_outbox_row_fails_raises_and_claims_nothing(
    settings: SettingsWrapper,
) -> None:
    """The claim commits with the call's outbox row or not at all: inside a transaction,
    a row that cannot be written fails the replay there, and the transaction rolls back."""
    from django.db import DatabaseError

    from deferred_signals.replay import replay

    dead_letter("lost at commit")
    down = make_app("down", "redis://127.0.0.1:1/0")
    with (
        use_app(down, settings, "nowhere"),
        outbox_table_gone(),
        pytest.raises(DatabaseError),
        transaction.atomic(),
    ):
        replay(DeadLetter.objects.all())
    assert DeadLetter.objects.get().replayed_at is None


def test_a_replay_that_fails_again_at_once_is_not_marked_replayed_after_its_failure(
    redis_queue: Queue,
) -> None:
    """A worker may take the replayed message and dead-letter it again before replay()
    marks the letter: the new failure wins."""
    from deferred_signals import deadletters, signals

    letter = dead_letter("fast")

    def fail_at_once(sender: Any, call_id: str, **kwargs: Any) -> None:
        deadletters.record(
            call_id=call_id, handler=EVENT, body=body("fast"), exception=RuntimeError("again")
        )

    signals.call_published.connect(fail_at_once)
    try:
        out, _ = command("replay", "--all")
    finally:
        signals.call_published.disconnect(fail_at_once)
    assert "replayed 1 dead letter(s)" in out and len(redis_queue) == 1
    failed_again = DeadLetter.objects.get(pk=letter.pk)
    assert failed_again.replayed_at is None and failed_again.message == "again"


def test_the_admin_replay_action_needs_the_change_permission(redis_queue: Queue) -> None:
    letter = dead_letter("admin")
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(*_permissions("view_deadletter"))
    client = Client()
    client.force_login(viewer)
    page = client.get("/admin/deferred_signals/deadletter/")
    assert page.status_code == 200 and letter.call_id in page.content.decode()
    assert "replay_selected" not in page.content.decode()  # no action without the permission
    client.post(
        "/admin/deferred_signals/deadletter/",
        {"action": "replay_selected", "_selected_action": [letter.pk]},
    )
    assert len(redis_queue) == 0

    staff = User.objects.create_user("operator", password="pw", is_staff=True)
    staff.user_permissions.add(*_permissions("view_deadletter", "change_deadletter"))
    client.force_login(staff)
    page = client.get("/admin/deferred_signals/deadletter/?q=" + letter.call_id)
    assert "replay_selected" in page.content.decode()
    response = client.post(
        "/admin/deferred_signals/deadletter/",
        {"action": "replay_selected", "_selected_action": [letter.pk]},
        follow=True,
    )
    assert "Replayed 1 dead letter(s)" in response.content.decode()
    ((task_id, sent),) = published(redis_queue)
    assert task_id == letter.call_id and sent["kwargs"]["label"] == "admin"
    # Read-only: no add form, no editable fields.
    assert client.get("/admin/deferred_signals/deadletter/add/").status_code == 403
    detail = client.get(f"/admin/deferred_signals/deadletter/{letter.pk}/change/")
    assert detail.status_code == 200 and 'name="handler"' not in detail.content.decode()


def test_a_dead_letters_page_has_no_save_and_writes_nothing() -> None:
    """Read-only means no Save button and no write: a POST would save the row as loaded,
    over a new failure the worker recorded meanwhile (its attempts, replayed_at cleared)."""
    letter = dead_letter("kept")
    operator = User.objects.create_user("operator", password="pw", is_staff=True)
    operator.user_permissions.add(*_permissions("view_deadletter", "change_deadletter"))
    client = Client()
    client.force_login(operator)
    url = f"/admin/deferred_signals/deadletter/{letter.pk}/change/"
    page = client.get(url)
    assert page.status_code == 200 and letter.call_id in page.content.decode()
    assert 'name="_save"' not in page.content.decode()
    with CaptureQueriesContext(connection) as queries:
        assert client.post(url, {"_save": "Save"}).status_code == 403
    assert not [q for q in queries if q["sql"].lstrip().upper().startswith("UPDATE")]
    # The list and its Replay action still need (and take) the change permission.
    listing = client.get("/admin/deferred_signals/deadletter/").content.decode()
    assert "replay_selected" in listing and f"{letter.pk}/change/" in listing


def test_the_admin_lists_pending_outbox_calls() -> None:
    OutboxCall.objects.create(
        id="pending-1", handler=EVENT, body="{}", next_attempt_at=timezone.now()
    )
    admin = User.objects.create_superuser("admin", password="pw")
    client = Client()
    client.force_login(admin)
    page = client.get("/admin/deferred_signals/outboxcall/")
    assert page.status_code == 200 and "pending-1" in page.content.decode()
    assert client.get("/admin/deferred_signals/outboxcall/add/").status_code == 403
    # Read-only for a superuser too: deleting a row would lose a committed call.
    assert "delete_selected" not in page.content.decode()
    client.post(
        "/admin/deferred_signals/outboxcall/",
        {"action": "delete_selected", "_selected_action": ["pending-1"], "post": "yes"},
    )
    assert client.get("/admin/deferred_signals/outboxcall/pending-1/delete/").status_code == 403
    assert OutboxCall.objects.filter(id="pending-1").exists()


def _permissions(*codenames: str) -> list[Any]:
    from django.contrib.auth.models import Permission

    return list(Permission.objects.filter(codename__in=codenames))


# --- relay ---------------------------------------------------------------------------------


def test_a_row_whose_handler_is_unknown_backs_off_then_becomes_a_dead_letter(
    redis_queue: Queue, settings: SettingsWrapper
) -> None:
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "RELAY_MAX_ATTEMPTS": 2}
    now = timezone.now()
    OutboxCall.objects.create(id="orphan", handler="gone.handler", body="{}", next_attempt_at=now)
    OutboxCall.objects.create(
        id="good", handler=EVENT, body=body_text(body("ok")), next_attempt_at=now
    )
    assert Relay().run_once() == 1
    orphan = OutboxCall.objects.get()
    assert orphan.attempts == 1 and "no deferred handler" in orphan.last_error
    assert orphan.next_attempt_at > timezone.now()  # backing off
    OutboxCall.objects.update(next_attempt_at=timezone.now())
    Relay().run_once()
    assert not OutboxCall.objects.exists()
    letter = DeadLetter.objects.get()
    assert (letter.call_id, letter.handler, letter.attempts) == ("orphan", "gone.handler", 2)
    assert [task_id for task_id, _ in published(redis_queue)] == ["good"]


def test_a_row_whose_publish_fails_on_our_side_backs_off_then_becomes_a_dead_letter(
    redis_queue: Queue, settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the broker's failure (here a route that raises for one call): the row counts an
    attempt and stops being first in line, so the rows behind it are published."""
    from deferred_signals.messages import MessageBuilder

    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "RELAY_MAX_ATTEMPTS": 2}
    build = MessageBuilder.build

    def failing(self: MessageBuilder, task: Any, call_id: str, *args: Any) -> Any:
        if call_id == "poison":
            raise TypeError("a route function with a bug")
        return build(self, task, call_id, *args)

    monkeypatch.setattr(MessageBuilder, "build", failing)
    now = timezone.now()
    # In the middle of one batch: the row blamed is the one that failed, not the first.
    for n, id in enumerate(("good-1", "poison", "good-2")):
        OutboxCall.objects.create(
            id=id, handler=EVENT, body=body_text(body(id)), next_attempt_at=now - (3 - n) * SECOND
        )
    Relay().run_once()
    assert not publisher.cooldown.active()
    poison = OutboxCall.objects.get(id="poison")
    assert poison.attempts == 1 and "a route function with a bug" in poison.last_error
    assert poison.next_attempt_at > timezone.now()  # backing off: no longer first in line
    assert all(row.attempts == 0 for row in OutboxCall.objects.exclude(id="poison"))
    Relay().run_once()
    assert sorted(task_id for task_id, _ in published(redis_queue)) == ["good-1", "good-2"]
    OutboxCall.objects.update(next_attempt_at=timezone.now())
    Relay().run_once()
    assert not OutboxCall.objects.exists()
    letter = DeadLetter.objects.get()
    assert (letter.call_id, letter.attempts) == ("poison", 2)


def test_a_row_whose_body_is_not_a_message_backs_off_then_becomes_a_dead_letter(
    redis_queue: Queue, settings: SettingsWrapper
) -> None:
    # JSON objects, but not messages: building one failed like a broker outage (a cooldown,
    # and the row first in line again on every round, holding up the rows behind it).
    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "RELAY_MAX_ATTEMPTS": 2}
    now = timezone.now()
    for id, text in (
        ("no-sender", '{"v": 1}'),
        ("list-kwargs", body_text({**body("l"), "kwargs": []})),
    ):
        OutboxCall.objects.create(id=id, handler=EVENT, body=text, next_attempt_at=now)
    OutboxCall.objects.create(
        id="good", handler=EVENT, body=body_text(body("ok")), next_attempt_at=now
    )
    assert Relay().run_once() == 1
    assert not publisher.cooldown.active()
    assert [task_id for task_id, _ in published(redis_queue)] == ["good"]
    for row in OutboxCall.objects.all():
        assert row.attempts == 1 and "not a message this package sends" in row.last_error
    OutboxCall.objects.update(next_attempt_at=timezone.now())
    Relay().run_once()
    assert not OutboxCall.objects.exists()
    assert sorted(DeadLetter.objects.values_list("call_id", flat=True)) == [
        "list-kwargs",
        "no-sender",
    ]


def _unroutable_commit(redis_queue: Queue, settings: SettingsWrapper, **options: Any) -> Any:
    """Route the handler to a queue Celery does not know (task_create_missing_queues off),
    commit one call, and return check E012's message."""
    from kombu import Queue as Declared

    from deferred_signals.checks import check_settings
    from tests.testapp.signals import user_registered

    settings.DEFERRED_SIGNALS = {
        **settings.DEFERRED_SIGNALS,
        **options,
        "HANDLERS": {EVENT: {"queue": "nowhere"}},
    }
    app = redis_queue.app
    app.conf.task_queues = [Declared(redis_queue.name)]
    app.conf.task_create_missing_queues = False
    (problem,) = [m for m in check_settings() if m.id == "deferred_signals.E012"]
    with transaction.atomic():
        user_registered.send(sender=None, label="unroutable")
    return problem


def test_a_queue_celery_cannot_route_to_spills_each_call_and_dead_letters_it(
    redis_queue: Queue, settings: SettingsWrapper
) -> None:
    """What E012 says happens to the calls: the commit succeeds, each call waits in the
    outbox, and the relay, refused too, keeps it as a dead letter; no message is sent. (It
    said each call would "fail at its commit", which reads as a request that fails.)"""
    problem = _unroutable_commit(redis_queue, settings, RELAY_MAX_ATTEMPTS=1)
    assert list(OutboxCall.objects.values_list("handler", flat=True)) == [EVENT]
    Relay().run_once()
    letter = DeadLetter.objects.get()
    assert letter.handler == EVENT and "QueueNotFound" in letter.message
    assert not OutboxCall.objects.exists() and redis_queue.messages() == []
    assert "so none reaches a worker: each call is spilled to the outbox at its commit, and " in (
        problem.msg
    )
    assert "retries it RELAY_MAX_ATTEMPTS times before it keeps it as a dead letter" in (
        problem.msg
    )


def test_a_call_celery_cannot_route_waits_out_the_relays_attempts_before_its_dead_letter(
    redis_queue: Queue, settings: SettingsWrapper
) -> None:
    """E012 said each call was "kept as a dead letter once the relay is refused too": with
    the default RELAY_MAX_ATTEMPTS, a refused relay backs the row off (some 17 minutes in
    all) and only the last attempt makes the dead letter; with DEAD_LETTERS off, none."""
    problem = _unroutable_commit(redis_queue, settings)
    Relay().run_once()
    assert not DeadLetter.objects.exists()
    assert list(OutboxCall.objects.values_list("attempts", flat=True)) == [1]
    assert "once the relay is refused too" not in problem.msg
    assert "(or drops it, with DEAD_LETTERS off)" in problem.msg


def test_a_row_is_kept_when_its_dead_letter_cannot_be_written(
    redis_queue: Queue, settings: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    # record() returns False when the dead-letter database refuses the row: deleting the
    # outbox row then would lose the committed call, with only a log line left of it.
    from deferred_signals import deadletters

    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "RELAY_MAX_ATTEMPTS": 1}
    monkeypatch.setattr(deadletters, "record", lambda **kwargs: False)
    OutboxCall.objects.create(
        id="orphan", handler="gone.handler", body="{}", next_attempt_at=timezone.now()
    )
    Relay().run_once()
    row = OutboxCall.objects.get(id="orphan")
    assert row.attempts == 1 and row.next_attempt_at > timezone.now()


def test_rows_in_their_grace_period_are_left_to_the_request(redis_queue: Queue) -> None:
    later = timezone.now() + datetime.timedelta(seconds=30)
    OutboxCall.objects.create(
        id="young", handler=EVENT, body=body_text(body("y")), next_attempt_at=later
    )
    assert Relay().run_once() == 0 and OutboxCall.objects.exists()


def test_relay_process_stops_on_sigterm_and_touches_its_health_file(
    postgres_only: None, redis_queue: Queue, tmp_path: Path
) -> None:
    health = tmp_path / "alive"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings_postgres",
        "DS_TEST_DB_DEFAULT": connection.settings_dict["NAME"],
        "DS_TEST_DB_OTHER": connections["other"].settings_dict["NAME"],
        "DS_TEST_BROKER": PUBLISH_REDIS_URL,
        "DS_TEST_QUEUE": redis_queue.name,
        "DS_TEST_EAGER": "0",
        "PYTHONPATH": str(ROOT),
    }
    command = ["tests/manage.py", "deferred_signals", "relay", "--health-file", str(health)]
    relay = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not health.exists():
            assert relay.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        OutboxCall.objects.create(
            id="relayed", handler=EVENT, body=body_text(body("r")), next_attempt_at=timezone.now()
        )
        while len(redis_queue) == 0:
            assert time.monotonic() < deadline, "the running relay did not publish the row"
            time.sleep(0.1)
        assert RelayHeartbeat.objects.exists()
        relay.send_signal(signal.SIGTERM)
        output = relay.communicate(timeout=30)[0].decode()
    finally:
        if relay.poll() is None:
            relay.kill()
    assert relay.returncode == 0, output
    assert "finishing the round in hand" in output and "relay stopped" in output
    assert [task_id for task_id, _ in published(redis_queue)] == ["relayed"]
    # Stopped cleanly: no heartbeat is left to look like a relay that stopped looping.
    assert not RelayHeartbeat.objects.exists()


def test_relay_once_touches_its_health_file_and_leaves_no_heartbeat(
    redis_queue: Queue, tmp_path: Path
) -> None:
    """A heartbeat row names a running relay (host:pid): a finished one would only show
    up in status as a relay that stopped looping."""
    health = tmp_path / "alive"
    out, _ = command("relay", "--once", "--health-file", str(health))
    assert "relayed 0 call(s)" in out and health.exists()
    assert not RelayHeartbeat.objects.exists()


def test_relay_once_says_what_it_leaves_for_later(redis_queue: Queue) -> None:
    """After a crash in outbox mode, ``relay --once`` found only rows within OUTBOX_GRACE and
    printed "relayed 0 call(s)" over an outbox that status showed full, without a reason."""
    now = timezone.now()
    for label, wait in (("graced", 25), ("backing-off", 40)):
        OutboxCall.objects.create(
            id=label,
            handler=EVENT,
            body=body_text(body(label)),
            next_attempt_at=now + wait * SECOND,
        )
    out, _ = command("relay", "--once")
    assert out.startswith("relayed 0 call(s); 2 more not due yet, the first in 2")
    assert "left OUTBOX_GRACE for its request to publish; a failed one backs off" in out
    assert OutboxCall.objects.count() == 2 and redis_queue.messages() == []


def test_common_options_may_follow_the_subcommand(redis_queue: Queue) -> None:
    """The reference gives ``relay ... -v 2``: argparse hands what follows a subcommand to
    that subcommand's parser, which must know Django's common options too."""
    due = timezone.now() - SECOND
    for label in ("after", "before"):
        OutboxCall.objects.create(
            id=label, handler=EVENT, body=body_text(body(label)), next_attempt_at=due
        )
        args = (
            ("relay", "--once", "-v", "2") if label == "after" else ("-v", "2", "relay", "--once")
        )
        out, _ = command(*args)
        assert "default: published 1, failed 0, dead-lettered 0" in out
    OutboxCall.objects.create(
        id="plain", handler=EVENT, body=body_text(body("plain")), next_attempt_at=due
    )
    out, _ = command("relay", "--once")  # not repeated: Django's default verbosity, 1
    assert out == "relayed 1 call(s)\n"
    assert "published" not in command("status", "--verbosity", "0", "--no-color")[0]


def test_the_health_file_is_touched_after_each_round_of_a_backlog(
    redis_queue: Queue, tmp_path: Path
) -> None:
    """A loop publishes until the outbox is drained: after an outage, minutes of rounds. A
    probe reading the file's age must see each round, or it kills a relay that works."""
    health = tmp_path / "alive"
    due = timezone.now() - SECOND
    for n in range(3):
        OutboxCall.objects.create(
            id=f"backlog-{n}", handler=EVENT, body=body_text(body(str(n))), next_attempt_at=due
        )
    seen: list[bool] = []

    def published(**kwargs: Any) -> None:
        seen.append(health.exists())

    signals.call_published.connect(published, weak=False)
    try:
        out, _ = command("relay", "--once", "--batch", "1", "--health-file", str(health))
    finally:
        signals.call_published.disconnect(published)
    assert "relayed 3 call(s)" in out
    assert seen == [False, True, True]


def test_a_failing_round_hook_does_not_rest_a_database_that_works(
    redis_queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    """The health file's touch failing (a full disk) after a committed round is not the
    database's failure: the relay goes on draining it, and says what failed."""
    due = timezone.now() - SECOND
    for n in range(3):
        OutboxCall.objects.create(
            id=f"hooked-{n}", handler=EVENT, body=body_text(body(str(n))), next_attempt_at=due
        )

    def touch(using: str, result: Any) -> None:
        raise OSError(28, "No space left on device")

    relay = Relay(batch=1, on_round=touch)
    assert relay.run_once() == 3
    assert not relay.failures and len(redis_queue) == 3
    assert "the per-round hook failed after a round of 'default'" in caplog.text


def test_relay_refuses_an_unconfigured_celery_app(postgres_only: None) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings_postgres",
        "DS_TEST_DB_DEFAULT": connection.settings_dict["NAME"],
        "DS_TEST_EAGER": "0",
        "PYTHONPATH": str(ROOT),
    }
    # python -m django: the project's Celery app is never imported (no proj/__init__.py).
    relay = subprocess.run(
        [sys.executable, "-m", "django", "deferred_signals", "relay", "--once"],
        cwd=ROOT, env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert relay.returncode != 0
    assert "has no broker_url" in relay.stderr.decode()
    assert "Import your Celery app when Django starts" in relay.stderr.decode()


# --- status and prune ----------------------------------------------------------------------


def test_status_reports_pending_rows_dead_letters_and_relays() -> None:
    OutboxCall.objects.create(
        id="p1",
        handler=EVENT,
        body="{}",
        created=timezone.now() - datetime.timedelta(seconds=90),
        next_attempt_at=timezone.now(),
    )
    dead_letter("a")
    dead_letter("b")
    RelayHeartbeat.objects.create(name="host:1", last_loop_at=timezone.now())
    report = json.loads(command("status", "--json")[0])
    default = next(entry for entry in report["outbox"] if entry["database"] == "default")
    assert default["pending"] == 1 and default["oldest_age_seconds"] >= 90
    assert report["dead_letters"] == {EVENT: 2}
    assert "host:1" in report["relays"]
    text = command("status")[0]
    assert "outbox default: 1 pending, oldest" in text
    assert f"dead letters not replayed: 2\n  {EVENT}: 2" in text
    assert "relay host:1: last loop 0 s ago" in text


def test_status_says_no_relay_runs_once_the_last_one_stopped() -> None:
    # A stopped relay removes its heartbeat: what is left must not read as one still busy.
    text = command("status")[0]
    assert "relays: none running (a relay shows here once it completes a loop" in text


def test_status_does_not_promise_that_a_relay_run_by_cron_shows(redis_queue: Queue) -> None:
    """``relay --once`` (cron) completes a loop but leaves no heartbeat: status said a relay
    "shows here once it completes a loop", so a working cron relay read as a missing one."""
    command("relay", "--once")
    assert not RelayHeartbeat.objects.exists()
    assert "relay --once never does" in command("status")[0]


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_status_and_prune_name_a_database_that_did_not_answer_and_fail(
    postgres_only: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its pending calls are unknown: leaving the database out would read as none pending,
    and a script or a probe would see a success."""
    OutboxCall.objects.using("other").create(
        id="unseen", handler=EVENT, body="{}", next_attempt_at=timezone.now()
    )
    other = connections["other"]
    monkeypatch.setitem(other.settings_dict, "PORT", "1")  # nothing listens there
    other.close()
    try:
        with pytest.raises(CommandError, match="did not answer: other"):
            command("status", "--json")
        out, err = StringIO(), StringIO()
        with pytest.raises(CommandError, match="did not answer: other"):
            call_command("deferred_signals", "status", "--json", stdout=out, stderr=err)
        report = json.loads(out.getvalue())  # the report is still printed, complete otherwise
        assert report["unreachable_databases"] == ["other"]
        assert [entry["database"] for entry in report["outbox"]] == ["default"]
        out = StringIO()
        with pytest.raises(CommandError):
            call_command("deferred_signals", "status", stdout=out)
        assert "outbox other: did not answer" in out.getvalue()
        out = StringIO()
        with pytest.raises(CommandError, match=r"not pruned: .* did not answer: other"):
            call_command("deferred_signals", "prune", stdout=out)
        assert "pruned 0 processed call id(s)" in out.getvalue()  # the others were
    finally:
        other.close()
    monkeypatch.undo()
    report = json.loads(command("status", "--json")[0])
    assert report["unreachable_databases"] == []
    assert {entry["database"]: entry["pending"] for entry in report["outbox"]} == {
        "default": 0,
        "other": 1,
    }


def test_prune_deletes_old_processed_ids_and_replayed_letters() -> None:
    old = timezone.now() - datetime.timedelta(days=8)
    ProcessedCall.objects.create(call_id="old", handler=EVENT, processed_at=old)
    ProcessedCall.objects.create(call_id="new", handler=EVENT)
    replayed, kept = dead_letter("r"), dead_letter("k")
    DeadLetter.objects.filter(pk=replayed.pk).update(replayed_at=old)
    out, _ = command("prune", "--older-than", "7d")
    # The age as the option takes it, not timedelta's "7 days, 0:00:00".
    assert "pruned 1 processed call id(s) and 1 replayed dead letter(s) older than 7d\n" in out
    assert "without a loop for 7d (relays killed or stuck)" in out
    assert "older than 90m\n" in command("prune", "--older-than", "90m")[0]
    assert "older than 1.5s\n" in command("prune", "--older-than", "1.5")[0]
    assert list(ProcessedCall.objects.values_list("call_id", flat=True)) == ["new"]
    assert list(DeadLetter.objects.values_list("pk", flat=True)) == [kept.pk]


def test_status_marks_stale_relays_and_prune_forgets_them() -> None:
    now = timezone.now()
    RelayHeartbeat.objects.create(name="live:1", last_loop_at=now)
    RelayHeartbeat.objects.create(name="gone:2", last_loop_at=now - datetime.timedelta(hours=1))
    RelayHeartbeat.objects.create(name="gone:3", last_loop_at=now - datetime.timedelta(days=9))
    report = json.loads(command("status", "--json")[0])
    assert set(report["relays"]) == {"live:1", "gone:2", "gone:3"}
    assert report["stale_relays"] == ["gone:2", "gone:3"]
    text = command("status")[0]
    assert "relay live:1: last loop 0 s ago\n" in text
    assert "relay gone:2: last loop 3600 s ago: stale (stopped or stuck)" in text
    assert json.loads(command("status", "--json", "--stale-after", "2h")[0])["stale_relays"] == [
        "gone:3"
    ]
    out, _ = command("prune", "--older-than", "7d")
    assert "pruned 1 relay heartbeat(s)" in out
    assert sorted(RelayHeartbeat.objects.values_list("name", flat=True)) == ["gone:2", "live:1"]


# --- configuration -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_w010_names_a_database_without_the_outbox_table() -> None:
    assert check_outbox_tables(databases=["default", "other"]) == []
    with transaction.atomic(using="other"):  # DDL rolls back on both backends
        with connections["other"].cursor() as cursor:
            cursor.execute(f"DROP TABLE {OutboxCall._meta.db_table}")
        (warning,) = check_outbox_tables(databases=["default", "other"])
        assert warning.id == "deferred_signals.W010" and "'other'" in warning.msg
        assert "migrate deferred_signals --database=other" in warning.hint
        # A database never migrated at all: this is the first `migrate` running the check
        # before it creates the tables; it must not be told to run migrate.
        with connections["other"].cursor() as cursor:
            cursor.execute("DROP TABLE django_migrations")
        assert check_outbox_tables(databases=["other"]) == []
        transaction.set_rollback(True, using="other")


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_w011_names_an_outbox_table_older_than_this_version() -> None:
    """Code deployed before `migrate`: the outbox lacks a column this version writes."""
    assert check_outbox_tables(databases=["default", "other"]) == []
    with transaction.atomic(using="other"):  # DDL rolls back on both backends
        with connections["other"].cursor() as cursor:  # SQLite >= 3.35 drops columns too
            cursor.execute(f"ALTER TABLE {OutboxCall._meta.db_table} DROP COLUMN trace")
        (warning,) = check_outbox_tables(databases=["default", "other"])
        assert warning.id == "deferred_signals.W011"
        assert "'other'" in warning.msg and "trace" in warning.msg
        assert "migrate deferred_signals --database=other" in warning.hint
        transaction.set_rollback(True, using="other")
    assert check_outbox_tables(databases=["default", "other"]) == []


def test_the_migrations_describe_the_models() -> None:
    """A model change without its migration would reach users as a schema their code lacks."""
    call_command("makemigrations", "deferred_signals", "--check", "--dry-run", verbosity=0)


@pytest.mark.django_db(transaction=True)
def test_the_previous_version_still_writes_the_outbox_after_migrate() -> None:
    """While a deploy rolls out after `migrate`, processes still running the version before
    the trace column insert rows without it (its raw INSERT, its spill's bulk_create): the
    database's own default fills it, and the relay takes the row."""
    table = connection.ops.quote_name(OutboxCall._meta.db_table)
    columns = ("id", "handler", "body", "created", "attempts", "next_attempt_at", "last_error")
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    body = body_text({"v": 1, "signal": 0, "sender": None, "kwargs": {"label": "old"}})
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES (%s, %s, %s, %s, 0, %s, '')",
            ["written-by-the-old-version", EVENT, body, now, now],
        )
    (row,) = OutboxCall.objects.all()
    assert row.trace == ""


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("PUBLISH_TIMEOUT", 0),
        ("PUBLISH_TIMEOUT", "2"),
        ("PUBLISH_COOLDOWN", -1),
        ("OUTBOX_GRACE", None),
        ("RELAY_MAX_ATTEMPTS", 0),
        ("DELIVERY", "pigeon"),
    ],
)
def test_top_level_settings_are_validated(key: str, value: Any) -> None:
    (problem,) = settings_problems({key: value})
    assert key in problem.msg and problem.id in ("deferred_signals.E007", "deferred_signals.E008")


def test_outbox_mode_without_the_table_fails_at_send_time_naming_the_fix(
    settings: SettingsWrapper, redis_queue: Queue
) -> None:
    from deferred_signals import DeferredSignalError
    from tests.testapp.signals import user_registered

    settings.DEFERRED_SIGNALS = {**settings.DEFERRED_SIGNALS, "DELIVERY": "outbox"}
    fix = "migrate deferred_signals --database=default"
    with pytest.raises(DeferredSignalError, match=fix), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE {OutboxCall._meta.db_table}")
        user_registered.send(sender=None, label="x")
    assert len(redis_queue) == 0
    publisher.reset()
