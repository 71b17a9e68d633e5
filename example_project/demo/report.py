"""What the worker did, read back from the audit log, checked and told in order."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.conf import settings

from accounts.models import AuditLog

from .scenario import SignUp

Event = AuditLog.Event
#: Entries the worker writes for every committed sign-up, once the CRM has accepted it.
WORKER_EVENTS = (Event.WELCOME_EMAIL, Event.REGISTERED, Event.CRM_SYNCED)


def entries(sign_ups: Iterable[SignUp]) -> list[AuditLog]:
    return list(AuditLog.objects.filter(username__in=[s.username for s in sign_ups]))


def pending(sign_ups: list[SignUp]) -> list[str]:
    """The entries the worker has yet to write; empty once it is all done."""
    done = {(e.username, e.event) for e in entries(sign_ups)}
    return [
        f"{event.label} for {s.username}"
        for s in sign_ups
        if s.committed is not None
        for event in WORKER_EVENTS
        if (s.username, event) not in done
    ]


def wait_for_worker(sign_ups: list[SignUp], timeout: float) -> float:
    """Poll the database until the worker has handled every call; seconds it took."""
    start = time.monotonic()
    while missing := pending(sign_ups):
        if time.monotonic() - start > timeout:
            raise TimeoutError(
                f"After {timeout:.0f} s the audit log still lacks: {', '.join(missing)}."
            )
        time.sleep(0.1)
    return time.monotonic() - start


@dataclass(frozen=True)
class Line:
    at: float
    pid: int
    username: str
    text: str


class Report:
    """The timeline of one demo run, and the checks that make its claims true."""

    def __init__(
        self, sign_ups: list[SignUp], mailbox: str, emails: int, expected_emails: int
    ) -> None:
        self.sign_ups = sign_ups
        self.expected_emails = expected_emails
        self.by_name = {s.username: s for s in sign_ups}
        self.entries = entries(sign_ups)
        self.mailbox = mailbox
        self.emails = emails
        self.here = os.getpid()
        self.origin = min(s.started for s in sign_ups)
        self.inline = {e.username: e for e in self.entries if e.event == Event.SIGNAL_RECEIVED}
        self.worker_entries = [e for e in self.entries if e.event != Event.SIGNAL_RECEIVED]
        self.committed = [s for s in sign_ups if s.committed is not None]

    def after_commit(self, entry: AuditLog) -> float:
        """Seconds from the commit of ``entry``'s sign-up to the entry (negative: before!)."""
        committed = self.by_name[entry.username].committed
        return entry.created_at.timestamp() - (committed if committed is not None else 0.0)

    def held_open(self, sign_up: SignUp) -> float:
        """Seconds the transaction stayed open after its signals were sent."""
        inline = self.inline.get(sign_up.username)
        if inline is None or sign_up.committed is None:
            return 0.0
        return sign_up.committed - inline.created_at.timestamp()

    # --- the checks ------------------------------------------------------------------------

    def problems(self) -> list[str]:
        problems = []
        for entry in self.worker_entries:
            who = f"{entry.handler} for {entry.username}"
            if entry.pid == self.here:
                problems.append(f"{who} ran in the demo process, not in the worker")
            if self.by_name[entry.username].committed is None:
                problems.append(f"{who} ran although the registration was rolled back")
            elif self.after_commit(entry) < 0:
                problems.append(f"{who} ran BEFORE the transaction committed")
        failures = settings.CRM_FAILURES_BEFORE_SUCCESS
        for sign_up in self.committed:
            count = self._count(sign_up.username, Event.CRM_SYNC_FAILED)
            if count != failures:
                problems.append(f"sync_to_crm failed {count} times for {sign_up.username}")
        if self.emails != self.expected_emails:
            problems.append(f"{self.emails} emails were written for {self.expected_emails} users")
        return problems

    def _count(self, username: str, event: str) -> int:
        return sum(1 for e in self.entries if e.username == username and e.event == event)

    # --- the story ---------------------------------------------------------------------------

    def timeline(self) -> list[str]:
        width = max(len(s.username) for s in self.sign_ups)
        out = [f"{'t (s)':>7}  {'process':<18} {'user':<{width}}  what happened"]
        for line in sorted(self._lines(), key=lambda line: line.at):
            process = f"pid {line.pid} ({'demo' if line.pid == self.here else 'worker'})"
            t = line.at - self.origin
            out.append(f"{t:7.3f}  {process:<18} {line.username:<{width}}  {line.text}")
        return out

    def _lines(self) -> Iterator[Line]:
        for sign_up in self.sign_ups:
            yield from self._sign_up_lines(sign_up)
        attempts: dict[str, int] = {}
        for entry in self.worker_entries:
            if entry.event in (Event.CRM_SYNC_FAILED, Event.CRM_SYNCED):
                attempt = attempts[entry.username] = attempts.get(entry.username, 0) + 1
                if entry.event == Event.CRM_SYNC_FAILED:
                    text = f"sync_to_crm attempt {attempt} FAILED: {entry.detail}; to be retried"
                else:
                    text = f"sync_to_crm attempt {attempt} succeeded"
            else:
                detail = f" {entry.detail}" if entry.detail else ""
                text = f"{entry.handler} ran: {entry.get_event_display()}{detail}"
            delay = self.after_commit(entry)
            shown = f"{delay * 1000:,.0f} ms" if delay < 1 else f"{delay:.1f} s"
            text += f"  [{shown} after commit]"
            yield Line(entry.created_at.timestamp(), entry.pid, entry.username, text)

    def _sign_up_lines(self, sign_up: SignUp) -> Iterator[Line]:
        name, here = sign_up.username, self.here
        yield Line(sign_up.started, here, name, sign_up.how)
        inline = self.inline.get(name)
        if inline is not None:
            text = "signals sent in the transaction; the plain receiver log_registration ran"
            yield Line(inline.created_at.timestamp(), here, name, text)
        if sign_up.committed is None:
            text = "signals sent, then the transaction ROLLED BACK: nothing published"
            yield Line(sign_up.finished, here, name, text)
            return
        held = self.held_open(sign_up)
        held_text = f" (held open {held:.2f} s after the signals)" if held > 0.1 else ""
        text = f"transaction COMMITTED{held_text}: deferred calls published"
        yield Line(sign_up.committed, here, name, text)
        returned = f"response {sign_up.response}" if sign_up.response else "command finished"
        yield Line(sign_up.finished, here, name, f"{returned} ({sign_up.took_ms:,.1f} ms)")

    def summary(self) -> list[str]:
        web = [s for s in self.committed if s.response]
        delays = [self.after_commit(e) for e in self.worker_entries]
        worker_pids = ", ".join(map(str, sorted({e.pid for e in self.worker_entries})))
        calls = len(self.committed) * len(WORKER_EVENTS)
        lines = [
            f"- The web sign-ups returned in {' and '.join(f'{s.took_ms:.1f} ms' for s in web)}"
            ": none of the email, audit or CRM work was done in the request.",
            f"- {calls} deferred calls ran {len(self.worker_entries)} times (retries included) "
            f"in the worker's processes {worker_pids}, never in the demo's (pid {self.here}).",
            f"- Each run began after its transaction had committed: the soonest "
            f"{min(delays) * 1000:,.0f} ms after.",
        ]
        for sign_up in self.committed:
            if (held := self.held_open(sign_up)) > 0.1:
                lines.append(
                    f"- {sign_up.username}'s transaction stayed open {held:.1f} s after the "
                    f"signals; the worker started nothing for {sign_up.username} until it "
                    "committed."
                )
        lines.append(
            f"- CRM sync failed {settings.CRM_FAILURES_BEFORE_SUCCESS} times for each user, "
            f"then succeeded: Celery retried it after {_backoff()} "
            "(settings.DEFERRED_SIGNALS['HANDLERS'])."
        )
        for sign_up in self.sign_ups:
            if sign_up.committed is None:
                lines.append(
                    f"- {sign_up.username}'s registration rolled back: the signals were sent, "
                    f"yet no deferred handler ran for {sign_up.username}."
                )
        lines.append(
            f"- {self.emails} welcome emails were written to {self.mailbox}/, one per committed "
            "sign-up of this run."
        )
        return lines


def _backoff() -> str:
    """The sync's retry delays: ``retry_backoff=True`` without jitter (1 s, 2 s, 4 s...)."""
    options = settings.DEFERRED_SIGNALS["HANDLERS"]["accounts.receivers.sync_to_crm"]
    delays = [
        min(options["retry_backoff_max"], 2**retry)
        for retry in range(settings.CRM_FAILURES_BEFORE_SUCCESS)
    ]
    return ", then ".join(f"{delay} s" for delay in delays)
