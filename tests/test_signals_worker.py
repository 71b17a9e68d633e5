"""Our signals end to end: a request on PostgreSQL, a real worker on Redis and on RabbitMQ.

Each call counts once where the docs' metrics example counts it: deferred, published (again
by a replay), started per attempt, then succeeded or failed for good, across a retry, a spill
and its relay, a dead letter and its replay. Both processes also run a receiver that raises
on every signal, connected before the counting one: a broken metrics exporter must change
nothing for the calls.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from pytest_django.fixtures import Settings as SettingsWrapper

from deferred_signals import publisher, signals
from deferred_signals.models import DeadLetter
from deferred_signals.relay import Relay
from deferred_signals.replay import replay
from tests.conftest import recording_worker, use_app, wait_for
from tests.signal_log import ENV, RAISE_ENV, read_events, record_to
from tests.testapp.models import Attempt, Record
from tests.testapp.signals import flaky_signal, soft_overrun_signal, user_registered
from tests.workers import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

USER_EVENT = "tests.user_event"
FLAKY = "tests.testapp.handlers.flaky"
EVERY_SIGNAL = ",".join(signals.__all__)


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def signalling_worker(
    request: pytest.FixtureRequest,
    django_db_setup: None,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[tuple[Worker, Path]]:
    """A real worker whose pool processes log our signals to a file, behind broken receivers."""
    monkeypatch_module.setenv("DS_TEST_WORKER_IMPORTS", "tests.signal_log")
    monkeypatch_module.setenv(RAISE_ENV, EVERY_SIGNAL)
    yield from recording_worker(request.param, tmp_path_factory, ENV, "signals.jsonl")


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_each_call_counts_once_where_it_happens(
    signalling_worker: tuple[Worker, Path], settings: SettingsWrapper, tmp_path: Path
) -> None:
    worker, worker_log = signalling_worker
    request_log = tmp_path / "request.jsonl"
    disconnect = record_to(str(request_log), signals.__all__)
    retried, dead = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        with use_app(worker.app, settings, worker.queue):
            with transaction.atomic():
                user_registered.send(sender=None, n=1)
            with transaction.atomic():  # fails once, then succeeds
                flaky_signal.send(sender=None, key=retried, fail_times=1)
            with transaction.atomic():  # four attempts fail: a dead letter; replayed, it succeeds
                flaky_signal.send(sender=None, key=dead, fail_times=4)
            publisher.cooldown.start(ConnectionError("the broker is down"))
            try:
                with transaction.atomic():  # spilled, then relayed
                    user_registered.send(sender=None, n=2)
            finally:
                publisher.cooldown.clear()
            assert Relay(databases=["default"]).run_once() == 1
            letter = wait_for(DeadLetter.objects.first, timeout=60, what="the dead letter")
            replayed, skipped = replay([letter])
            assert replayed == [letter] and not skipped
            wait_for(
                lambda: Record.objects.filter(handler="flaky").count() == 2,
                timeout=60,
                what="both flaky calls to succeed",
            )
            wait_for(
                lambda: Record.objects.filter(handler="user_event").count() == 2,
                timeout=60,
                what="both user_event calls to run",
            )
    finally:
        disconnect()

    def events() -> list[dict[str, Any]]:
        return read_events(request_log) + read_events(worker_log)

    # A retry's signals may be written after the next attempt's (another pool child).
    wait_for(lambda: len(events()) >= 33, timeout=30, what="the worker's last signals")
    calls: dict[str, list[tuple[str, int | None]]] = defaultdict(list)
    for event in events():
        calls[event["call_id"]].append((event["name"], event["attempt"]))
    # Two processes, and two pool children taking turns on a retried call: counted, not
    # ordered.
    counted = sorted((sorted(events, key=repr) for events in calls.values()), key=len)
    once = [("call_deferred", None), ("call_published", None)]
    assert counted == [
        sorted([*once, ("handler_started", 1), ("handler_succeeded", 1)], key=repr),
        sorted([*once, ("call_spilled", None), ("handler_started", 1), ("handler_succeeded", 1)],
               key=repr),
        sorted([*once, ("handler_started", 1), ("handler_failed", 1), ("handler_retried", 1),
                ("handler_started", 2), ("handler_succeeded", 2)], key=repr),
        sorted([*once,
                *[(name, n) for n in (1, 2, 3)
                  for name in ("handler_started", "handler_failed", "handler_retried")],
                ("handler_started", 4), ("handler_failed", 4), ("call_dead_lettered", None),
                # The replay: published again under the same id, attempts counted afresh.
                ("call_published", None), ("handler_started", 1), ("handler_succeeded", 1)],
               key=repr),
    ]  # fmt: skip
    assert letter.call_id in calls
    finals = [
        event["final"] for event in read_events(worker_log) if event["name"] == "handler_failed"
    ]
    assert finals.count(True) == 1  # the one failure for good, of the dead letter
    assert "BrokenReceiverError" in worker.log()


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def stalling_worker(
    request: pytest.FixtureRequest,
    django_db_setup: None,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[Worker]:
    """A real worker whose handler_started receiver hangs on soft_overrun's runs."""
    monkeypatch_module.setenv("DS_TEST_WORKER_IMPORTS", "tests.stalled_receiver")
    for worker, _ in recording_worker(request.param, tmp_path_factory, ENV, "unused.jsonl"):
        yield worker


def test_a_soft_time_limit_met_in_a_receiver_still_stops_the_call(
    stalling_worker: Worker, settings: SettingsWrapper
) -> None:
    """Billiard raises SoftTimeLimitExceeded wherever the child is, here in a hanging
    handler_started receiver: taken for the receiver's failure, it was logged and dropped, and
    the handler then ran with no soft time limit left (to its end, or to the hard limit's
    kill). It is the call's: failed for good and kept as a dead letter, the handler never
    started."""
    key = uuid.uuid4().hex
    with use_app(stalling_worker.app, settings, stalling_worker.queue):
        soft_overrun_signal.send(sender=None, key=key, seconds=3)
    letter = wait_for(
        lambda: DeadLetter.objects.filter(body__contains=key).first(),
        timeout=30,
        what="the dead letter",
    )
    assert letter.exception == "billiard.exceptions.SoftTimeLimitExceeded"
    assert "time.sleep(5)" in letter.traceback  # met in the receiver
    assert not Attempt.objects.filter(key=f"soft_overrun-{key}").exists()  # never started
    assert not Record.objects.filter(handler="soft_overrun").exists()
