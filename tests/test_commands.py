"""``manage.py deferred_signals``."""

from __future__ import annotations

import json
from io import StringIO

from django.conf import settings
from django.core.management import call_command
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
