"""The worker main process's dead letters, written by a thread of their own (no database:
``deadletters.write`` is replaced). The real worker test is in test_worker_faults.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError

from deferred_signals import deadletters, letter_writer


@pytest.fixture
def main_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """This process as a worker's main process; records the call ids written."""
    written: list[str] = []
    monkeypatch.setattr(letter_writer, "RETRY", (0.01, 0.02))
    monkeypatch.setattr(letter_writer, "SHUTDOWN_WAIT", 0.5)
    # Undone after the test: the value before on_worker_init(), not this process's pid.
    monkeypatch.setattr(letter_writer, "_main_pid", letter_writer._main_pid)
    letter_writer.on_worker_init()
    yield written
    letter_writer._stopping.set()
    monkeypatch.setattr(letter_writer, "_main_pid", None)


def letter(call_id: str) -> dict[str, Any]:
    return {"call_id": call_id, "handler": "h", "body": "{}", "exception": KeyError()}


def test_outside_a_worker_a_letter_is_written_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    monkeypatch.setattr(deadletters, "write", lambda **kw: bool(written.append(kw["call_id"])))
    letter_writer.keep(**letter("now"))
    assert written == ["now"]


def test_the_main_process_hands_letters_over_and_failed_writes_are_retried(
    main_process: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    release, failures = threading.Event(), iter([True, True])

    def write(**kw: Any) -> bool:
        release.wait(5)  # a database that hangs, then cannot be reached twice, then answers
        if next(failures, False):
            raise OperationalError("connection refused")
        main_process.append(kw["call_id"])
        return True

    monkeypatch.setattr(deadletters, "write", write)
    # ...since the database cannot be reached: no connection answers.
    monkeypatch.setattr(deadletters, "_reachable", lambda using: False, raising=False)
    letter_writer.keep(**letter("a"))
    letter_writer.keep(**letter("b"))
    assert main_process == []  # keep() returned while the database hangs
    release.set()
    letter_writer._pending.join()
    assert main_process == ["a", "b"]


def test_a_letter_the_database_refuses_for_its_own_reason_is_not_retried(
    main_process: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def write(**kw: Any) -> bool:
        if kw["call_id"] == "bad":
            raise ValueError("refused")
        main_process.append(kw["call_id"])
        return True

    monkeypatch.setattr(deadletters, "write", write)
    letter_writer.keep(**letter("bad"))  # would otherwise hold every letter behind it
    letter_writer.keep(**letter("good"))
    letter_writer._pending.join()
    assert main_process == ["good"]
    assert "LOST the dead letter of call bad" in caplog.text


def test_what_the_database_never_took_is_logged_at_shutdown(
    main_process: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def write(**kw: Any) -> bool:
        raise OperationalError("connection refused")

    monkeypatch.setattr(deadletters, "write", write)
    monkeypatch.setattr(deadletters, "_reachable", lambda using: False, raising=False)
    for call_id in ("x", "y"):
        letter_writer.keep(**letter(call_id))
    letter_writer.on_worker_shutdown()
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LOST")]
    assert sorted(line.split()[6] for line in lost) == ["x", "y"]  # once each


@pytest.mark.django_db
def test_a_letter_a_database_that_answers_refuses_does_not_hold_up_the_others(
    main_process: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A real write, to a database that answers: SQLite raises OperationalError for a missing
    # table, as MySQL does for an unknown column. Retrying it would block the writer for good.
    from django.db import connection

    def write(**_: Any) -> bool:
        with connection.cursor() as cursor:  # the writer thread's own connection
            cursor.execute("SELECT call_id FROM no_such_dead_letter_table")
        return True

    monkeypatch.setattr(deadletters, "write", write)
    letter_writer.keep(**letter("refused"))
    done = threading.Thread(target=letter_writer._pending.join, daemon=True)
    done.start()
    done.join(5)
    assert not done.is_alive()  # not retried: the letters behind it are not held up
    assert "LOST the dead letter of call refused" in caplog.text


@pytest.mark.django_db(transaction=True)
# Python 3.12+ warns of exactly this hazard on every fork of a process with threads.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_process_forked_while_the_writer_holds_its_locks_writes_its_letters(
    postgres_only: None, main_process: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's prefork pool forks children from the main process while its writer thread
    runs (a child lost, --max-tasks-per-child), gunicorn --preload forks too: a child may
    inherit the writer's locks held and its queue's letters. A real fork at that moment: the
    child writes its own letter at once, to the real database, and does not hang or take the
    parent's letters; the parent's writer carries on."""
    from django.db import connections

    from deferred_signals.models import DeadLetter

    parent, release = os.getpid(), threading.Event()
    real_write = deadletters.write

    def write(**kw: Any) -> bool:
        if os.getpid() == parent:
            release.wait(10)  # the parent's database hangs while the child is forked
        return real_write(**kw)

    monkeypatch.setattr(deadletters, "write", write)
    letter_writer.keep(**letter("parent's"))  # the writer takes it, and hangs
    connections.close_all()  # the child opens its own, as Celery's Django fixup makes it
    held = threading.Event()

    def hold_everything() -> None:  # the worst moment: every lock of the writer taken
        with letter_writer._lock, letter_writer._pending.mutex:
            held.set()
            release.wait(10)

    threading.Thread(target=hold_everything, daemon=True).start()
    assert held.wait(5)
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's coverage is not collected)
        code = 1
        try:
            letter_writer.keep(**letter("child's"))
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        pytest.fail("the forked child hung on a lock its parent's writer thread held")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert list(DeadLetter.objects.values_list("call_id", flat=True)) == ["child's"]
    release.set()
    letter_writer._pending.join()
    assert sorted(DeadLetter.objects.values_list("call_id", flat=True)) == ["child's", "parent's"]
