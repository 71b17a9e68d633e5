"""``manage.py deferred_signals``."""

from __future__ import annotations

import json
import re
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings


def run(*args: str) -> str:
    out = StringIO()
    call_command("deferred_signals", "list", *args, stdout=out)
    return out.getvalue()


def test_lists_handlers_with_signals_senders_and_merged_options() -> None:
    handlers = {
        **settings.DEFERRED_SIGNALS["HANDLERS"],
        "tests.user_event": {"queue": "crm", "max_retries": 8},
    }
    with override_settings(DEFERRED_SIGNALS={"HANDLERS": handlers}):
        text = run()
        entries = {entry["name"]: entry for entry in json.loads(run("--json"))}
    assert "tests.user_event\n" in text and "queue=crm, max_retries=8" in text
    assert "django.db.models.signals.post_save from testapp.Article" in text
    event = entries["tests.user_event"]
    assert [c["signal"] for c in event["connections"]] == [
        "tests.testapp.signals.user_registered",
        "tests.testapp.signals.user_invited",
    ]
    assert event["connections"][0]["sender"] == "any sender"
    assert event["options"]["queue"] == "crm"
    flaky = entries["tests.testapp.handlers.flaky"]
    assert flaky["options"]["autoretry_for"] == ["tests.testapp.handlers.FlakyError"]
    assert entries["tests.testapp.handlers.marker"]["options"]["max_retries"] == 3  # Celery's
    assert entries["tests.testapp.handlers.ticket_saved"]["include_raw"] is True


def test_the_former_command_name_still_lists_handlers() -> None:
    out = StringIO()
    call_command("deferred_handlers", "--json", stdout=out)
    assert json.loads(out.getvalue()) == json.loads(run("--json"))


def test_the_former_command_name_takes_the_list_options() -> None:
    out = StringIO()
    call_command("deferred_handlers", "--no-workers", "--timeout", "0.1", "--json", stdout=out)
    assert json.loads(out.getvalue()) == json.loads(run("--json", "--no-workers"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["relay", "--batch", "0"], "argument --batch: must be a whole number of 1 or more"),
        (["relay", "--batch", "-5"], "argument --batch: must be a whole number of 1 or more"),
        (["relay", "--batch", "many"], "argument --batch: must be a whole number of 1 or more"),
        (["relay", "--database", "nope"], "--database 'nope': no such database alias"),
        (
            ["relay", "--database", "default", "--health-file", "/nonexistent/dir/alive"],
            "--health-file /nonexistent/dir/alive: its directory /nonexistent/dir does not exist",
        ),
        (
            ["prune", "--older-than", "7x"],
            "argument --older-than: '7x' is not a duration such as 7d, 12h, 30m or 45s",
        ),
        (
            ["status", "--stale-after", "soon"],
            "argument --stale-after: 'soon' is not a duration such as 7d, 12h, 30m or 45s",
        ),
    ],
)
def test_arguments_are_checked_before_anything_runs(args: list[str], message: str) -> None:
    # No database access allowed here: the checks come before any query.
    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("deferred_signals", *args, stdout=StringIO(), stderr=StringIO())
