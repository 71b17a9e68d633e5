"""Dead letters on a real worker: retries run out, the letter keeps the traceback, and a replay
(from the command, and from the admin through a real request) runs the handler again with the
same call id."""

from __future__ import annotations

import uuid
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import transaction
from django.test import Client

from deferred_signals.models import DeadLetter
from tests.conftest import records, wait_for
from tests.testapp.models import Attempt
from tests.testapp.signals import flaky_signal
from tests.workers import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

FLAKY = "tests.testapp.handlers.flaky"


def fail_for_good(key: str) -> DeadLetter:
    """max_retries=3 in settings: 4 runs fail, the 5th (a replay) succeeds."""
    with transaction.atomic():
        flaky_signal.send(sender=None, key=key, fail_times=4)
    letter: DeadLetter = wait_for(
        lambda: DeadLetter.objects.filter(handler=FLAKY, body__contains=key).first(),
        timeout=60,
        what="the dead letter",
    )
    assert Attempt.objects.get(key=key).count == 4
    return letter


def flaky_record(key: str) -> dict[str, str]:
    (found,) = wait_for(
        lambda: [r for r in records("flaky") if key in str(r.call)], timeout=60, what="the rerun"
    )
    kwargs: dict[str, str] = {k: v["repr"] for k, v in found.call["kwargs"].items()}
    return kwargs


def test_retries_exhausted_make_a_dead_letter_replayed_by_the_command(deferred_to: Worker) -> None:
    key = uuid.uuid4().hex
    letter = fail_for_good(key)
    assert letter.exception == "tests.testapp.handlers.FlakyError"
    assert f"attempt 4 of {key}" in letter.message
    assert "Traceback" in letter.traceback and "FlakyError" in letter.traceback
    assert letter.attempts == 4
    out = StringIO()
    call_command("deferred_signals", "replay", str(letter.id), stdout=out)
    assert "replayed 1 dead letter(s)" in out.getvalue()
    rerun = flaky_record(key)
    assert rerun["attempts"] == "5" and rerun["call"] == repr(letter.call_id)
    print(f"\n[{deferred_to.broker}] dead letter replayed by the command: ran again, same call id")


def test_the_admin_replay_action_runs_the_handler_again(deferred_to: Worker) -> None:
    key = uuid.uuid4().hex
    letter = fail_for_good(key)
    staff = User.objects.create_user(f"ops-{key[:8]}", password="pw", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_deadletter", "change_deadletter"])
    )
    client = Client()
    assert client.login(username=staff.username, password="pw")
    response = client.post(
        "/admin/deferred_signals/deadletter/",
        {"action": "replay_selected", "_selected_action": [letter.pk]},
        follow=True,
    )
    assert "Replayed 1 dead letter(s)" in response.content.decode()
    rerun = flaky_record(key)
    assert rerun["attempts"] == "5" and rerun["call"] == repr(letter.call_id)
    letter.refresh_from_db()
    assert letter.replayed_at is not None
    print(f"\n[{deferred_to.broker}] dead letter replayed from the admin: ran again, same call id")
