"""Why one defers: the same sign-up with the handlers inline, then deferred, side by side."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

from django.conf import settings

from accounts.models import AuditLog

from .scenario import SignUp

Event = AuditLog.Event
#: What each handler writes once it has run, inline or on the worker.
HANDLER_EVENTS = (Event.WELCOME_EMAIL, Event.REGISTERED, Event.CRM_SYNCED)


def _ms(sign_ups: list[SignUp]) -> float:
    return statistics.median(s.took_ms for s in sign_ups)


@dataclass
class Comparison:
    inline: list[SignUp]
    deferred: list[SignUp]

    @property
    def services_ms(self) -> float:
        """What a sign-up waits for when it calls the SMTP server and the CRM itself."""
        return (settings.SMTP_LATENCY + settings.CRM_LATENCY) * 1000

    def lines(self) -> list[str]:
        width = max(len(s.username) for s in self.inline + self.deferred)

        def row(label: str, sign_ups: list[SignUp]) -> str:
            times = ", ".join(f"{s.username:<{width}} {s.took_ms:6,.0f} ms" for s in sign_ups)
            return f"{label:<36} {times}   median {_ms(sign_ups):6,.0f} ms"

        inline, deferred = _ms(self.inline), _ms(self.deferred)
        lines = [
            f"The SMTP server takes {settings.SMTP_LATENCY * 1000:,.0f} ms to accept an email, the "
            f"CRM {settings.CRM_LATENCY * 1000:,.0f} ms to answer (EXAMPLE_SMTP_LATENCY, "
            "EXAMPLE_CRM_LATENCY).",
            row("handlers inline (EAGER), CRM healthy:", self.inline),
            row("handlers deferred to the worker:", self.deferred),
        ]
        if deferred > 0:
            lines.append(
                f"A deferred sign-up answered {inline / deferred:,.0f}x sooner: the request "
                "commits, publishes and returns; the worker talks to SMTP and the CRM."
            )
        return lines

    def summary(self) -> str:
        return (
            f"- With the handlers inline, a sign-up waited {_ms(self.inline):,.0f} ms for SMTP and "
            f"the CRM (median); deferred, it answered in {_ms(self.deferred):,.0f} ms."
        )

    def problems(self) -> list[str]:
        problems = []
        here = os.getpid()
        names = [s.username for s in self.inline]
        ran = {
            (e.username, e.event): e
            for e in AuditLog.objects.filter(username__in=names, event__in=HANDLER_EVENTS)
        }
        for sign_up in self.inline:
            for event in HANDLER_EVENTS:
                entry = ran.get((sign_up.username, event))
                if entry is None or entry.pid != here:
                    problems.append(f"inline: {event.label} did not run in the request")
                elif entry.created_at.timestamp() > sign_up.finished:
                    problems.append(f"inline: {event.label} ran after the response")
        if self.services_ms > 0:
            for sign_up in self.deferred:
                if sign_up.took_ms >= self.services_ms:
                    problems.append(
                        f"the deferred sign-up of {sign_up.username} took {sign_up.took_ms:.0f} "
                        f"ms, as long as calling SMTP and the CRM ({self.services_ms:.0f} ms)"
                    )
        return problems
