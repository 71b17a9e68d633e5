"""End to end, the worker's faults: poison and forged messages, killed children, a database
outage, duplicate deliveries. Real ``celery worker`` processes, PostgreSQL, Redis/RabbitMQ.

Each test prints its figures (``pytest -s`` shows them): calls sent / completed / lost / run
twice, and whether the worker is alive.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any

import pytest
from celery import _state as celery_state
from celery import current_app
from django.core.management import call_command
from django.db import connections, transaction
from kombu import Exchange, Queue
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import DeferredSignalError, registry
from deferred_signals.codec import MAX_DEPTH
from deferred_signals.models import DeadLetter
from deferred_signals.replay import replay
from tests.conftest import on_postgres, records, require, sync_calls, wait_for
from tests.faults import FaultProxy
from tests.testapp.models import Article, Attempt, Author
from tests.testapp.signals import (
    counted_signal,
    killable_signal,
    overrun_signal,
    user_registered,
)
from tests.workers import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

ARTICLE_SAVED = "tests.testapp.handlers.article_saved"
USER_EVENT = "tests.user_event"


def unique() -> str:
    return uuid.uuid4().hex[:12]


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def publish_raw(
    worker: Worker,
    task: str,
    body: Any,
    *,
    headers: dict[str, Any] | None = None,
    text: bool = False,
) -> str:
    """A message as Celery's protocol 2 would carry it, with whatever body and headers."""
    task_id = str(uuid.uuid4())
    all_headers = {
        "lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
        "group": None, "retries": 0, "timelimit": [None, None], "eta": None, "expires": None,
        "argsrepr": "()", "kwargsrepr": "{}", "origin": "tests", "ignore_result": True,
    }  # fmt: skip
    all_headers.update(headers or {})
    all_headers = {key: value for key, value in all_headers.items() if value is not ...}
    queue = Queue(worker.queue, Exchange(worker.queue), routing_key=worker.queue)
    options: dict[str, Any] = (
        {"content_type": "application/json", "content_encoding": "utf-8"}
        if text
        else {"serializer": "json"}
    )
    with worker.app.connection_for_write() as connection:
        connection.Producer().publish(
            body,
            exchange=queue.exchange,
            routing_key=worker.queue,
            headers=all_headers,
            declare=[queue],
            **options,
        )
    return task_id


def call(sender: Any, **kwargs: Any) -> list[Any]:
    """Celery's ``[args, kwargs, embed]`` around one of our bodies."""
    body = {"v": 1, "signal": 0, "sender": sender, "kwargs": kwargs}
    return [[], body, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def article_ref(pk: Any, model: str = "testapp.article") -> dict[str, Any]:
    return {"$t": "model", "m": model, "pk": pk, "db": "default", "fresh": True}


def test_poison_and_forged_messages_never_stop_the_worker(deferred_to: Worker) -> None:
    marker = unique()
    # A row made without signals: a forged message that got through would record its title.
    (article,) = Article.objects.bulk_create([Article(title=marker)])
    author = Author.objects.create(name=marker)
    article_class = {"$t": "modelclass", "v": "testapp.Article"}
    saved = {"created": True, "update_fields": None, "raw": False, "using": "default"}
    deep_text = '[[], {"v": 1, "signal": 0, "sender": null, "kwargs": {"x": %s}}, {}]' % (
        "[" * 5000 + "]" * 5000
    )
    poison = {  # Celery itself would die on these (issue 8, point 1)
        "a string body": ("just a string", {}, False),
        "a number body": (5, {}, False),
        "a two-item body": ([[], {}], {}, False),
        "a dict body with args": ({"args": [], "kwargs": {}}, {}, False),
        "800 levels deep": (call(None, x=nested(800), label=marker), {}, False),
        "5000 levels deep": (deep_text, {}, True),
        "a bad timelimit": (call(None, label=marker), {"timelimit": "soon"}, False),
        # Kept raw: PostgreSQL's text refuses NUL, so such a dead letter used to be lost.
        "a NUL in a body that does not decode": (f"\x00{marker}", {}, True),
    }
    forged = {  # well-formed, but not what this code base sends (points 3 and 4)
        "fresh instance, null pk": (
            ARTICLE_SAVED, call(article_class, instance=article_ref(None), **saved)
        ),
        "pk 'abc' for an int pk": (
            ARTICLE_SAVED, call(article_class, instance=article_ref("abc"), **saved)
        ),
        "sender auth.User for sender=Article": (
            ARTICLE_SAVED,
            call({"$t": "modelclass", "v": "auth.User"}, instance=article_ref(article.pk), **saved),
        ),
        "an Author as an Article's instance": (
            ARTICLE_SAVED,
            call(article_class, instance=article_ref(author.pk, "testapp.author"), **saved),
        ),
        "class subprocess.Popen as a value": (
            USER_EVENT, call(None, label=marker, x={"$t": "class", "v": "subprocess:Popen"})
        ),
        "class builtins.type as a value": (
            USER_EVENT, call(None, label=marker, x={"$t": "class", "v": "builtins:type"})
        ),
        "class subprocess.Popen as sender": (
            USER_EVENT, call({"$t": "class", "v": "subprocess:Popen"}, label=marker)
        ),
    }  # fmt: skip
    ids = {}
    for what, (body, headers, text) in poison.items():
        ids[what] = publish_raw(deferred_to, USER_EVENT, body, headers=headers, text=text)
    for what, (task, body) in forged.items():
        ids[what] = publish_raw(deferred_to, task, body)
    no_id_before = deferred_to.log().count("Rejected message no-id-")
    publish_raw(deferred_to, USER_EVENT, call(None, label=marker), headers={"id": ...})

    def good_calls(round_: str) -> None:
        title = f"{marker}-{round_}"
        Article.objects.create(title=title)
        deferred_to.app.send_task("tests.plain_task", args=[title], queue=deferred_to.queue)
        wait_for(
            lambda: [r for r in records(ARTICLE_SAVED.rsplit(".", 1)[1]) if title in str(r.call)],
            timeout=60,
            what=f"a good call after the bad ones ({round_})",
        )
        wait_for(
            lambda: [r for r in records("plain_task") if r.call["label"] == title],
            timeout=60,
            what=f"another task of the same worker ({round_})",
        )

    good_calls("before restart")
    log = ""
    for what, message_id in ids.items():
        line = f"Rejected message {message_id} for deferred handler task"
        log = wait_for(
            lambda line=line: line in (text := deferred_to.log()) and text,
            what=f"the rejection of {what}",
        )
        # Logged once (the test settings' console handler echoes it without Celery's prefix).
        assert log.count(f"] {line}") == 1, what
        assert f"{message_id}] retry" not in log, what  # never retried
    wait_for(lambda: deferred_to.log().count("Rejected message no-id-") > no_id_before)
    assert "Unrecoverable error" not in log
    alive = deferred_to.alive()
    dead_letters = set(
        DeadLetter.objects.filter(call_id__in=ids.values()).values_list("call_id", flat=True)
    )

    deferred_to.stop()  # a restarted worker finds nothing left to choke on
    deferred_to.start()
    good_calls("after restart")
    alive_after_restart = deferred_to.alive()
    ran = [r for r in records() if marker in json.dumps(r.call)]
    forged_runs = [r for r in ran if f"{marker}-" not in json.dumps(r.call)]
    print(
        f"\n[{deferred_to.broker}] bad messages sent {len(ids) + 1}, refused {len(ids) + 1}, "
        f"handler runs {len(forged_runs)}, retried 0, dead letters {len(dead_letters)}, "
        f"good calls 2/2; worker alive: {yes(alive)}, after restart: {yes(alive_after_restart)}"
    )
    assert forged_runs == []
    assert dead_letters == set(ids.values())
    assert alive and alive_after_restart


def test_a_call_just_under_the_depth_limit_arrives_intact(deferred_to: Worker) -> None:
    label = unique()
    with transaction.atomic():
        user_registered.send(sender=None, label=label, nested=nested(MAX_DEPTH))
    (record,) = wait_for(
        lambda: [r for r in records("user_event") if label in str(r.call)], what="the deep call"
    )
    assert record.call == sync_calls("user_event")[0]
    with pytest.raises(DeferredSignalError) as info, transaction.atomic():
        user_registered.send(sender=None, label=label, nested=nested(MAX_DEPTH + 1))
    assert all(word in str(info.value) for word in (USER_EVENT, "'nested'", str(MAX_DEPTH)))
    print(f"\n[{deferred_to.broker}] depth {MAX_DEPTH}: delivered 1/1; depth {MAX_DEPTH + 1}: "
          "refused at send time")  # fmt: skip


def test_a_child_killed_mid_handler_reruns_the_call(deferred_to: Worker) -> None:
    keys = [unique() for _ in range(20)]
    for key in keys:  # autocommit: each is published at once
        killable_signal.send(sender=None, key=key, seconds=1.0)
    killed: dict[str, int] = {}
    deadline = time.monotonic() + 240
    while len(killed) < len(keys) and time.monotonic() < deadline:
        for record in records("killable_start"):
            key = record.call["key"]
            if key in keys and key not in killed:
                os.kill(record.pid, signal.SIGKILL)  # a worker child, mid-handler
                killed[key] = record.pid
        time.sleep(0.02)
    wait_for(
        lambda: len({r.call["key"] for r in records("killable_done")} & set(keys)) == len(keys),
        timeout=240,
        what="every killed call to complete",
    )
    starts: dict[str, list[dict[str, Any]]] = {}
    for record in records("killable_start"):
        starts.setdefault(record.call["key"], []).append(record.call)
    done = {r.call["key"]: r.call for r in records("killable_done") if r.call["key"] in keys}
    twice = sum(len(starts[key]) >= 2 for key in keys)
    print(
        f"\n[{deferred_to.broker}] children SIGKILLed mid-handler {len(killed)}, calls sent "
        f"{len(keys)}, completed {len(done)}, lost {len(keys) - len(done)}, run twice {twice}; "
        f"worker alive: {yes(deferred_to.alive())}"
    )
    assert len(killed) == len(done) == len(keys)
    for key in keys:  # the same call, redelivered: one id from start to end
        assert {start["id"] for start in starts[key]} == {done[key]["id"]}
    # Redelivered, so never kept as a dead letter as well.
    assert not DeadLetter.objects.filter(call_id__in=[call["id"] for call in done.values()])
    assert deferred_to.alive()


def test_an_idempotent_handler_writes_once_per_call(deferred_to: Worker) -> None:
    key, call_id = unique(), str(uuid.uuid4())
    body = {"v": 1, "signal": 0, "sender": None, "kwargs": {"key": key}}
    task = registry.get("tests.testapp.handlers.counted").task  # type: ignore[union-attr]
    for _ in range(2):  # the same message twice, as a redelivery would
        task.apply_async(kwargs=body, task_id=call_id, queue=deferred_to.queue)
    wait_for(lambda: f"call {call_id} was already processed" in deferred_to.log())
    counted_signal.send(sender=None, key=key)  # another call: a write of its own
    wait_for(lambda: Attempt.objects.filter(key=key, count=2).exists(), what="the second call")
    time.sleep(0.5)
    count = Attempt.objects.get(key=key).count
    print(f"\n[{deferred_to.broker}] idempotent: deliveries 3 (2 calls), writes {count}")
    assert count == 2


# --- a database outage at the worker ------------------------------------------------------


@contextmanager
def proxied_worker(
    pool: str,
    window: float,
    settings: SettingsWrapper,
    tmp_path: Any,
    dead_letters: str | None = "other",
    connect_timeout: str = "3",
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Worker, FaultProxy]]:
    """A Redis worker reaching the default database through a proxy; dead letters go to
    the ``dead_letters`` database (by default the other one, which stays reachable)."""
    if not on_postgres():
        pytest.skip("end-to-end: runs in make test's PostgreSQL pass")
    require("redis")
    names = {alias: connections[alias].settings_dict["NAME"] for alias in ("default", "other")}
    with FaultProxy(int(connections["default"].settings_dict["PORT"] or 5432)) as proxy:
        worker = Worker(
            "redis", names, tmp_path, pool=pool,
            env={
                "DS_TEST_PG_PORT_DEFAULT": str(proxy.port),
                "DS_TEST_DB_RETRY_WINDOW": str(window),
                "DS_TEST_PG_CONNECT_TIMEOUT": connect_timeout,
                **({"DS_TEST_DEADLETTER_DB": dead_letters} if dead_letters else {}),
                **(env or {}),
            },
        )  # fmt: skip
        worker.start()
        settings.DEFERRED_SIGNALS = {
            **settings.DEFERRED_SIGNALS, "EAGER": False, "DEFAULTS": {"queue": worker.queue}
        }  # fmt: skip
        previous, previous_default = current_app._get_current_object(), celery_state.default_app
        worker.app.set_current()
        worker.app.set_default()
        try:
            yield worker, proxy
        finally:
            previous.set_current()
            celery_state.set_default_app(previous_default)
            worker.stop()
            worker.delete_queue()


def labelled(label: str) -> list[Any]:
    return [r for r in records("user_event") if r.call["kwargs"]["label"]["repr"] == repr(label)]


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_short_database_outage_loses_nothing(
    pool: str, settings: SettingsWrapper, tmp_path: Any
) -> None:
    label, author = unique(), Author.objects.create(name="outage")
    with proxied_worker(pool, 900, settings, tmp_path) as (worker, proxy):
        proxy.refuse()
        cut_at = time.monotonic()
        for i in range(20):  # they arrive during the cut; the worker's fetch fails
            user_registered.send(sender=None, instance=author, label=label, i=i)
            time.sleep(0.2)
        time.sleep(max(0.0, 6 - (time.monotonic() - cut_at)))
        proxy.forward()
        wait_for(lambda: len(labelled(label)) >= 20, timeout=180, what="20 calls after the cut")
        time.sleep(1)
        numbers = sorted(int(r.call["kwargs"]["i"]["repr"]) for r in labelled(label))
        retried = sum(
            "WARNING/" in line and "database error, retry in" in line
            for line in worker.log().splitlines()
        )
        print(
            f"\n[redis/{pool}] database cut 6 s: calls sent 20, completed {len(set(numbers))}, "
            f"lost {20 - len(set(numbers))}, run twice {len(numbers) - len(set(numbers))}, "
            f"database retries {retried}; worker alive: {yes(worker.alive())}"
        )
        assert numbers == list(range(20))
        assert retried > 0 and worker.alive()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_an_outage_past_the_retry_window_makes_dead_letters_to_replay(
    pool: str, settings: SettingsWrapper, tmp_path: Any
) -> None:
    label, author = unique(), Author.objects.create(name="outage")
    letters = DeadLetter.objects.using("other")
    with proxied_worker(pool, 3, settings, tmp_path) as (worker, proxy):
        proxy.refuse()
        for i in range(20):
            user_registered.send(sender=None, instance=author, label=label, i=i)
        dead = wait_for(
            lambda: (found := list(letters.filter(body__contains=label))) and len(found) >= 20
            and found,
            timeout=120,
            what="20 dead letters",
        )  # fmt: skip
        assert labelled(label) == []
        assert {letter.exception for letter in dead} == {"django.db.utils.OperationalError"}
        proxy.forward()
        # Replay: the same body, the same call id, through the normal publish path.
        replayed, skipped = replay(dead)
        assert len(replayed) == 20 and skipped == []
        assert all(letter.replayed_at for letter in letters.filter(body__contains=label))
        wait_for(lambda: len(labelled(label)) >= 20, timeout=120, what="20 replayed calls")
        time.sleep(1)
        numbers = sorted(int(r.call["kwargs"]["i"]["repr"]) for r in labelled(label))
        print(
            f"\n[redis/{pool}] database cut past db_retry_window=3 s: calls sent 20, dead "
            f"letters {len(dead)}, replayed and completed {len(set(numbers))}/20, run twice "
            f"{len(numbers) - len(set(numbers))}; worker alive: {yes(worker.alive())}"
        )
        assert numbers == list(range(20))
        assert worker.alive()


UNRECORDED = re.compile(r"Could not record the dead letter of call (\S+)")
HELD = re.compile(r"\[(\S+)\] failed for good on attempt \d+ \(\S+\), but its dead letter")
WAIT = re.compile(r"but its dead letter could not be written: retry in ([\d.]+) s")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_an_outage_past_the_window_that_takes_the_dead_letters_too_loses_nothing(
    pool: str, settings: SettingsWrapper, tmp_path: Any
) -> None:
    """Dead letters on the database that is down: the message is the call's only copy."""
    label, author = unique(), Author.objects.create(name="outage")
    with proxied_worker(pool, 3, settings, tmp_path, dead_letters=None) as (worker, proxy):
        proxy.refuse()
        for i in range(20):
            user_registered.send(sender=None, instance=author, label=label, i=i)
        # Each call past the window, its dead letter refused: the point where one was lost.
        wait_for(
            lambda: len(set(UNRECORDED.findall(worker.log()))) >= 20,
            timeout=120,
            what="20 calls past db_retry_window whose dead letters could not be written",
        )
        proxy.forward()
        wait_for(lambda: len(labelled(label)) >= 20, timeout=120, what="20 calls after the cut")
        time.sleep(1)
        numbers = sorted(int(r.call["kwargs"]["i"]["repr"]) for r in labelled(label))
        held = len(set(HELD.findall(worker.log())))
        print(
            f"\n[redis/{pool}] database and dead letters cut past db_retry_window=3 s: calls "
            f"sent 20, completed {len(set(numbers))}, lost {20 - len(set(numbers))}, run twice "
            f"{len(numbers) - len(set(numbers))}, retried for want of a dead letter {held}; worker "
            f"alive: {yes(worker.alive())}"
        )
        assert numbers == list(range(20))
        assert not DeadLetter.objects.filter(body__contains=label).exists()
        assert worker.alive()


def test_a_call_for_a_name_no_handler_answers_to_is_a_dead_letter(deferred_to: Worker) -> None:
    """A handler renamed without aliases, or removed, while calls were queued under its name."""
    marker = unique()
    gone = "tests.testapp.handlers.renamed_away"
    ours = [publish_raw(deferred_to, gone, call(None, label=marker, i=i)) for i in range(3)]
    retried = publish_raw(deferred_to, gone, call(None, label=marker, i=3), headers={"retries": 2})
    foreign = publish_raw(deferred_to, gone, [[marker], {}, {}])  # another producer's task
    for message_id in [*ours, retried, foreign]:
        wait_for(
            lambda message_id=message_id: message_id in deferred_to.log(),
            what=f"the unregistered message {message_id}",
        )
    found = wait_for(
        lambda: (kept := list(DeadLetter.objects.filter(handler=gone))) and len(kept) >= 4 and kept,
        what="4 dead letters",
    )
    letters = {letter.call_id: letter for letter in found}
    time.sleep(0.5)  # the foreign message, logged by Celery, is not kept
    status = StringIO()
    call_command("deferred_signals", "status", stdout=status)
    print(
        f"\n[{deferred_to.broker}] calls for an unregistered name sent 4, dead letters "
        f"{len(letters)}; a foreign task's message kept: "
        f"{yes(DeadLetter.objects.filter(call_id=foreign).exists())}; worker alive: "
        f"{yes(deferred_to.alive())}"
    )
    assert set(letters) == {*ours, retried}
    assert not DeadLetter.objects.filter(call_id=foreign).exists()
    letter = letters[ours[0]]
    assert letter.exception == "celery.exceptions.NotRegistered"
    assert json.loads(letter.body) == call(None, label=marker, i=0)[1]
    assert letters[retried].attempts == 2
    assert f"{gone}: 4" in status.getvalue()
    assert deferred_to.alive()


def test_a_hung_database_does_not_stop_the_worker_keeping_a_lost_call(
    settings: SettingsWrapper, tmp_path: Any
) -> None:
    """The main process keeps a call its pool lost; the database it writes to hangs."""
    key = unique()
    with proxied_worker(
        "prefork", 900, settings, tmp_path, dead_letters=None, connect_timeout=""
    ) as (worker, proxy):
        proxy.blackhole()  # accepts connections, never answers; no connect_timeout
        started = time.monotonic()
        # The handler hangs on the database; its hard time_limit (2 s) kills the child.
        overrun_signal.send(sender=None, key=key, seconds=0.0)
        wait_for(lambda: "was stopped by its hard time limit" in worker.log(), timeout=60)
        # The main process goes on meanwhile: it takes, logs and hands out the next message.
        plain = worker.app.send_task("tests.plain_task", args=[key], queue=worker.queue).id
        wait_for(
            lambda: f"Task tests.plain_task[{plain}] received" in worker.log(),
            timeout=20,
            what="the worker's main process to take a message while the database hangs",
        )
        answered = time.monotonic() - started
        proxy.forward()  # the writer's connection is reset; it tries again and succeeds
        letter = wait_for(
            lambda: DeadLetter.objects.filter(body__contains=key).first(),
            timeout=60,
            what="the dead letter, once the database answers",
        )
        print(
            f"\n[redis/prefork] database hung during a hard time limit: worker took the next "
            f"message {answered:.1f} s after the call was sent; dead letter kept once the "
            f"database answered: {yes(letter is not None)}; worker alive: {yes(worker.alive())}"
        )
        assert letter.exception == "billiard.exceptions.TimeLimitExceeded"
        assert worker.alive()


def test_outage_retries_wait_less_than_redis_takes_to_hand_them_out_again(
    settings: SettingsWrapper, tmp_path: Any
) -> None:
    """A retry waiting for its countdown is a message Redis redelivers after visibility_timeout:
    each copy then fails and retries in turn, for as long as the outage lasts."""
    label, author = unique(), Author.objects.create(name="outage")
    env = {"DS_TEST_VISIBILITY_TIMEOUT": "10"}
    with proxied_worker("prefork", 900, settings, tmp_path, env=env) as (worker, proxy):
        proxy.refuse()
        for i in range(5):
            user_registered.send(sender=None, instance=author, label=label, i=i)
        time.sleep(40)  # backoff 1, 2, 4, 8, 16, 32 s: past 10 s, Redis hands retries out again
        proxy.forward()
        wait_for(lambda: len(labelled(label)) >= 5, timeout=90, what="5 calls after the cut")
        time.sleep(15)  # the copies Redis handed out, if any, run too
        numbers = sorted(int(r.call["kwargs"]["i"]["repr"]) for r in labelled(label))
        print(
            f"\n[redis/prefork] visibility_timeout=10 s, database cut 40 s: calls sent 5, "
            f"completed {len(set(numbers))}, handler runs {len(numbers)}; worker alive: "
            f"{yes(worker.alive())}"
        )
        assert numbers == list(range(5))


def test_a_dead_letter_database_that_stays_down_keeps_the_call_retrying_at_a_bounded_pace(
    settings: SettingsWrapper, tmp_path: Any
) -> None:
    """Past db_retry_window, with the dead letters' database down as long as the test runs:
    the worker never gives the call up (no retry limit, nothing acknowledged without a copy),
    retries at most every min(60 s, visibility_timeout / 2) however long the outage, logs
    each retry at ERROR with the call id, and runs the call once the database is back."""
    label, author = unique(), Author.objects.create(name="outage")
    env = {"DS_TEST_VISIBILITY_TIMEOUT": "4"}  # the longest wait: 2 s, for the test's sake
    with proxied_worker("prefork", 1, settings, tmp_path, dead_letters=None, env=env) as (
        worker,
        proxy,
    ):
        proxy.refuse()
        user_registered.send(sender=None, instance=author, label=label, i=0)
        held = wait_for(
            lambda: (ids := HELD.findall(worker.log())) and len(ids) >= 8 and ids,
            timeout=90,
            what="8 retries of a call whose dead letter cannot be written",
        )
        proxy.forward()
        wait_for(lambda: labelled(label), timeout=60, what="the call once the database is back")
        time.sleep(1)
        waits = [float(wait) for wait in WAIT.findall(worker.log())]
        print(
            f"\n[redis/prefork] dead letters' database down past db_retry_window=1 s: retries "
            f"for want of the dead letter {len(held)}, longest wait {max(waits):.1f} s, handler "
            f"runs after the cut {len(labelled(label))}; worker alive: {yes(worker.alive())}"
        )
        assert len(set(held)) == 1  # one call, retried again and again, never dropped
        assert len(waits) == len(held) and max(waits) <= 2.0  # half the visibility_timeout
        assert len(labelled(label)) == 1 and worker.alive()
