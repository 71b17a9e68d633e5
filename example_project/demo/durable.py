"""The durable path: the broker cut under the web side, and a handler that fails for good.

``Outage`` cuts the web side's link to the broker (demo/outage.py) while sign-ups go on, and
watches the calls go to the outbox, the relay try them while the broker is still away and
publish them once it is back, and the worker run them. ``DeadLetters`` follows a call whose
handler the CRM refuses: its dead letter, the data fixed, ``deferred_signals replay``, and
the same call running again, successfully.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

from deferred_signals.conf import conf
from deferred_signals.models import DeadLetter, OutboxCall, RelayHeartbeat
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client

from accounts.models import AuditLog

from . import scenario
from .outage import BrokerLink
from .processes import Relay, Worker

Event = AuditLog.Event
OUTAGE_USERS = [("erin", "erin@example.com"), ("frank", "frank@example.com")]
#: The deferred handlers each sign-up sends a call to (post_save: 1, user_registered: 2).
CALLS_PER_SIGN_UP = 3
CRM_HANDLER = "accounts.receivers.sync_to_crm"
REJECTED_USER = ("grace", "grace@example.invalid")
FIXED_EMAIL = "grace@example.com"


def wait_for(what: str, condition: Callable[[], object], timeout: float) -> float:
    """Poll ``condition`` until it holds; the time it held (``time.time()``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"After {timeout:.0f} s, still waiting for {what}.")
        time.sleep(0.1)
    return time.time()


@contextmanager
def kept_logs(name: str) -> Iterator[list[logging.LogRecord]]:
    """Keep a logger's records instead of printing them (the demo tells them itself)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger(name)
    saved, logger.handlers = logger.handlers, [Keep()]
    try:
        yield records
    finally:
        logger.handlers = saved


@dataclass
class Spill:
    sign_up: scenario.SignUp
    rows: list[OutboxCall]

    @property
    def reason(self) -> str:
        errors = {row.last_error.split(":", 1)[0] for row in self.rows}
        if errors == {"BrokerUnavailable"}:
            return "broker cooling down (PUBLISH_COOLDOWN), not even tried"
        return f"the publish failed ({', '.join(sorted(errors))})"


@dataclass
class Outage:
    link: BrokerLink
    worker: Worker
    relay: Relay
    spills: list[Spill] = field(default_factory=list)
    logs: list[logging.LogRecord] = field(default_factory=list)
    cut_at = restored_at = relay_tried_at = delivered_at = 0.0
    pending_when_tried = 0
    worker_ran_through = False

    @property
    def call_ids(self) -> list[str]:
        return [row.id for spill in self.spills for row in spill.rows]

    def run(self, client: Client, timeout: float) -> None:
        self.cut_at = time.time()
        self.link.cut()
        with kept_logs("deferred_signals") as self.logs, scenario.observe_commits() as commits:
            for username, email in OUTAGE_USERS:
                before = set(OutboxCall.objects.values_list("id", flat=True))
                sign_up = scenario.sign_up_on_the_web(client, username, email)
                sign_up.committed = commits.get(username)
                rows = list(OutboxCall.objects.exclude(id__in=before))
                self.spills.append(Spill(sign_up, rows))
        spilled_at = time.time()
        # The relay comes round (it polls with backoff, up to 5 s): the broker is still cut.
        self.relay_tried_at = wait_for(
            "the relay to try the outbox",
            RelayHeartbeat.objects.filter(last_loop_at__gt=_aware(spilled_at)).exists,
            timeout,
        )
        self.pending_when_tried = OutboxCall.objects.filter(id__in=self.call_ids).count()
        self.worker_ran_through = self.worker.running()
        self.link.restore()
        self.restored_at = time.time()
        self.delivered_at = wait_for(
            "the relay to publish the spilled calls",
            lambda: not OutboxCall.objects.filter(id__in=self.call_ids).exists(),
            timeout,
        )

    def relayed(self) -> int:
        """Calls the relay reported publishing (``-v 2``: "default: published 6, ...")."""
        text = self.relay.log_path.read_text(errors="replace")
        return sum(int(n) for n in re.findall(r"^\S+: published (\d+),", text, re.MULTILINE))

    def lines(self) -> list[str]:
        t = self.cut_at
        width = max(len(s.sign_up.username) for s in self.spills)
        events = [
            (
                t,
                f"broker CUT for the web side and the relay; the worker (pid {self.worker.pid}) "
                "keeps running",
            )
        ]
        for spill in self.spills:
            s = spill.sign_up
            events.append(
                (
                    s.started,
                    f"{s.username:<{width}}  {s.how} -> {s.response} in {s.took_ms:,.0f} ms; "
                    f"{spill.reason}: {len(spill.rows)} calls spilled to the outbox",
                )
            )
        events += [
            (
                self.relay_tried_at,
                f"relay (pid {self.relay.pid}) came round: broker still cut, "
                f"{self.pending_when_tried} calls kept in the outbox",
            ),
            (self.restored_at, "broker RESTORED"),
            (
                self.delivered_at,
                f"the outbox is empty: the relay published the calls ({self.relayed()} in its log)",
            ),
        ]
        if entries := self.worker_entries():
            first = min(e.created_at.timestamp() for e in entries)
            last = max(e.created_at.timestamp() for e in entries)
            events.append(
                (
                    first,
                    f"the worker ran the first of them; the last (CRM retries included) at "
                    f"{last - t:.3f}",
                )
            )
        lines = [f"{at - t:7.3f}  {text}" for at, text in sorted(events, key=lambda e: e[0])]
        warnings = [r for r in self.logs if r.levelno >= logging.WARNING]
        if warnings:
            lines.append(
                f"         (the web side logged {len(warnings)} WARNINGs, e.g. "
                f'"{warnings[0].getMessage()}")'
            )
        return lines

    def summary(self) -> str:
        took = " and ".join(f"{s.sign_up.took_ms:,.0f} ms" for s in self.spills)
        return (
            f"- With the broker cut, sign-ups still answered in {took}; their "
            f"{len(self.call_ids)} calls waited in the outbox, the relay published them once the "
            "broker was back, and the worker ran every one, none during the outage."
        )

    def worker_entries(self) -> list[AuditLog]:
        names = [s.sign_up.username for s in self.spills]
        return list(AuditLog.objects.filter(username__in=names).exclude(pid=os.getpid()))

    def problems(self) -> list[str]:
        problems = []
        bound = conf.publish_timeout * 1000
        for spill in self.spills:
            s = spill.sign_up
            if s.took_ms >= bound:
                problems.append(f"{s.username}'s sign-up took {s.took_ms:.0f} ms in the outage")
            if len(spill.rows) != CALLS_PER_SIGN_UP:
                problems.append(f"{len(spill.rows)} calls spilled for {s.username}")
        spilled = len(self.call_ids)
        if not self.worker_ran_through:
            problems.append("the worker did not survive the outage")
        if self.pending_when_tried != spilled:
            problems.append(f"the relay's try in the outage left {self.pending_when_tried} rows")
        if self.relayed() < spilled:
            problems.append(f"the relay's log reports {self.relayed()} calls, not {spilled}")
        for entry in self.worker_entries():
            if entry.created_at.timestamp() < self.restored_at:
                problems.append(f"{entry.handler} for {entry.username} ran during the outage")
        return problems


@dataclass
class DeadLetters:
    """grace's CRM sync: refused for good, dead-lettered, fixed, replayed, done."""

    sign_up: scenario.SignUp
    letter: DeadLetter | None = None
    fixed_at = replayed_at = 0.0
    replay_output = ""
    synced: AuditLog | None = None

    def run(self, timeout: float) -> None:
        name = self.sign_up.username
        self.letter = DeadLetter.objects.get(
            call_id=self._wait_for_letter(timeout), handler=CRM_HANDLER
        )
        # What support does once the CRM's refusal is read: fix the data...
        User.objects.filter(username=name).update(email=FIXED_EMAIL)
        self.fixed_at = time.time()
        # ...and replay the call: same message, same call id; the worker fetches the row anew.
        out = io.StringIO()
        call_command("deferred_signals", "replay", "--handler", CRM_HANDLER, stdout=out)
        self.replayed_at = time.time()
        self.replay_output = out.getvalue()
        synced = AuditLog.objects.filter(username=name, event=Event.CRM_SYNCED)
        wait_for(f"{name}'s replayed CRM sync", synced.exists, timeout)
        self.synced = synced.get()
        self.letter.refresh_from_db()

    def _wait_for_letter(self, timeout: float) -> str:
        letters = DeadLetter.objects.filter(handler=CRM_HANDLER)
        wait_for(f"the dead letter of {self.sign_up.username}'s CRM sync", letters.exists, timeout)
        return str(letters.values_list("call_id", flat=True).get())

    def entries(self) -> list[AuditLog]:
        return list(
            AuditLog.objects.filter(
                username=self.sign_up.username,
                event__in=(Event.CRM_SYNC_FAILED, Event.CRM_SYNC_REJECTED),
            )
        )

    def lines(self) -> list[str]:
        s, t = self.sign_up, self.sign_up.started
        lines = [f"{0:7.3f}  {s.how} ({s.email}) -> {s.response} in {s.took_ms:,.0f} ms"]
        for attempt, entry in enumerate(self.entries(), 1):
            what = "FAILED, retried" if entry.event == Event.CRM_SYNC_FAILED else "not retried"
            lines.append(
                f"{entry.created_at.timestamp() - t:7.3f}  worker: sync_to_crm attempt "
                f"{attempt}: {entry.detail} [{what}]"
            )
        letter = self.letter
        if letter is not None:
            lines.append(
                f"{letter.last_failed_at.timestamp() - t:7.3f}  dead letter #{letter.pk}: "
                f"{letter.handler} [{letter.call_id}], {letter.exception}, "
                f"{letter.attempts} attempts (the admin lists it)"
            )
        lines.append(f"{self.fixed_at - t:7.3f}  support corrects the address: {FIXED_EMAIL}")
        command = f"manage.py deferred_signals replay --handler {CRM_HANDLER}"
        lines.append(f"{self.replayed_at - t:7.3f}  $ {command}")
        lines += [f"           {line}" for line in self.replay_output.splitlines()]
        if self.synced is not None:
            lines.append(
                f"{self.synced.created_at.timestamp() - t:7.3f}  worker (pid {self.synced.pid}): "
                f"sync_to_crm succeeded ({self.synced.detail}: the same call), with the row "
                "fetched afresh"
            )
        return lines

    def summary(self) -> str:
        return (
            f"- {self.sign_up.username}'s CRM sync, refused for good, became a dead letter; "
            "replayed once the address was fixed, it ran again under the same call id."
        )

    def problems(self) -> list[str]:
        letter, synced = self.letter, self.synced
        if letter is None or synced is None:
            return ["the dead letter was not replayed"]
        problems = []
        if letter.exception != "accounts.crm.CRMRejected":
            problems.append(f"the dead letter records {letter.exception}")
        if letter.replayed_at is None:
            problems.append("the dead letter is not marked replayed")
        if DeadLetter.objects.count() != 1:
            problems.append(f"{DeadLetter.objects.count()} dead letters, not 1")
        if synced.detail != f"call {letter.call_id[:8]}":
            problems.append(f"the replay ran as {synced.detail!r}, not call {letter.call_id}")
        if synced.created_at.timestamp() < self.replayed_at or synced.pid == os.getpid():
            problems.append("the replayed sync did not run on the worker after the replay")
        return problems


def _aware(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc)
