"""``manage.py demo``: sign users up while a real Celery worker runs the deferred handlers."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.test import Client

from demo import durable, latency, report, scenario, state
from demo.outage import broker_link
from demo.processes import ProcessError, Relay, Service, Worker

LINGERING_USER = ("carol", "carol@example.com")
WEB_USERS = [("alice", "alice@example.com"), ("bob", "bob@example.com")]
ROLLED_BACK_USER = ("dave", "dave@example.com")
INLINE_USERS = [("ivan", "ivan@example.com"), ("judy", "judy@example.com")]
USERNAMES = [
    name
    for name, _ in [
        LINGERING_USER,
        *WEB_USERS,
        ROLLED_BACK_USER,
        durable.REJECTED_USER,
        *INLINE_USERS,
        *durable.OUTAGE_USERS,
    ]
]


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # By default SIGTERM/SIGHUP end Python without unwinding, which would leave the worker
    # running; as SystemExit they run the `finally` that stops it, as Ctrl-C does.
    raise SystemExit(128 + signum)


class Command(BaseCommand):
    help = (
        "Run the example end to end: a fresh database, a real celery worker and relay, "
        "sign-ups through the web form and the register_user command, handlers inline versus "
        "deferred, the broker cut and restored, a dead letter replayed; then what ran where, "
        "and when, checked."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="Seconds to wait for each step: processes starting, the worker, the relay "
            "(default 60).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _exit_on_signal)
        # The timeline below tells what the inline receiver logs, and what each commit
        # published; don't say it twice (the package's INFO lines would land mid-story).
        logging.getLogger("accounts").setLevel(logging.WARNING)
        logging.getLogger("deferred_signals").setLevel(logging.WARNING)
        self.timeout: float = options["timeout"]
        say = self.stdout.write

        say("deferred_signals demo\n")
        done = state.reset_database(USERNAMES)
        say(f"  database  {state.describe_database()} ({done})")
        state.reset_broker()
        link = broker_link().open()
        say(f"  broker    {state.describe_broker()}")
        say(f"            queue {settings.QUEUE!r}; the web side and the relay reach it through")
        say(f"            {link.what}, which the demo cuts half-way")
        password = state.ensure_admin()
        say(f"  admin     `make runserver`, then /admin/ as admin, password {password!r}")
        mailbox = state.reset_mailbox()

        worker = Worker(settings.STATE_DIR / "worker.log")
        relay = Relay(settings.STATE_DIR / "relay.log", env={"DEMO_PUBLISH_VIA": link.via})
        self.client = Client(enforce_csrf_checks=True)
        interrupted = 0  # the exit status, when a signal cut the demo short
        finished = False
        try:
            self._start(worker, relay)
            story, rejected = self._sign_up()
            comparison = self._compare(story)
            outage = durable.Outage(link, worker, relay)
            say("\nCutting the broker under the web side, signing up erin and frank ...", ending="")
            self.stdout.flush()
            outage.run(self.client, self.timeout)
            say(" restored, relayed.")
            say("Waiting for the worker to handle every deferred call ...", ending="")
            self.stdout.flush()
            outage_sign_ups = [spill.sign_up for spill in outage.spills]
            took = report.wait_for_worker(story + outage_sign_ups, self.timeout)
            say(f" done in {took:.1f} s.")
            letters = durable.DeadLetters(rejected)
            letters.run(self.timeout)
            finished = True
        except (ProcessError, TimeoutError) as error:
            tails = "\n".join(
                f"--- the {p.name}'s log, last lines ---\n{p.log_tail()}" for p in (worker, relay)
            )
            raise CommandError(f"{error}\n{tails}") from error
        except KeyboardInterrupt:
            interrupted = 130
        except SystemExit as exit_:  # SIGTERM or SIGHUP, see _exit_on_signal
            interrupted = int(exit_.code or 1)
        finally:
            self._stop(finished, relay, worker)
            link.close()
        if interrupted:
            raise CommandError("Interrupted.", returncode=interrupted)
        for process in (worker, relay):
            if leftovers := process.leftovers():
                raise CommandError(f"{process.name} processes were left running: {leftovers}")

        # Count messages, not files: Django's file backend names a file after the time and
        # id(backend), which two forked worker processes can share, and then appends to it.
        files = sorted(mailbox.glob("*")) if mailbox.is_dir() else []
        emails = sum(path.read_text().count("\nMessage-ID: ") for path in files)
        committed = [s for s in story if s.committed is not None]
        expected = len(committed) + 1 + len(INLINE_USERS) + len(outage.spills)
        result = report.Report(story, state.shown(mailbox), emails, expected)
        sections: list[tuple[str, list[str], Callable[[], list[str]]]] = [
            (
                "What happened, in order (t: seconds since the first sign-up):",
                result.timeline(),
                result.problems,
            ),
            ("Why one defers: the same sign-up, twice each way.", comparison.lines(), list),
            (
                "The broker cut (t: seconds since the cut):",
                outage.lines(),
                outage.problems,
            ),
            (
                "A handler that fails for good (t: seconds since grace signed up):",
                letters.lines(),
                letters.problems,
            ),
        ]
        problems = comparison.problems()
        for title, lines, check in sections:
            say(f"\n{title}")
            for line in lines:
                say(f"  {line}")
            problems += check()
        say("\nSo:")
        for line in [*result.summary(), comparison.summary(), outage.summary(), letters.summary()]:
            say(f"  {line}")
        if problems:
            raise CommandError("The demo saw something wrong:\n  " + "\n  ".join(problems))
        say(self.style.SUCCESS("\nOK: all of the above checked; no worker process left behind."))

    def _start(self, worker: Worker, relay: Relay) -> None:
        say = self.stdout.write
        worker.start()
        relay.start()
        say(f"  worker    `celery worker --queues {settings.QUEUE}` started, pid {worker.pid}")
        say(
            f"  relay     `manage.py deferred_signals relay` started, pid {relay.pid} ...",
            ending="",
        )
        self.stdout.flush()
        ready = max(worker.wait_until_ready(self.timeout), relay.wait_until_ready(self.timeout))
        say(f" both ready in {ready:.1f} s (logs: {state.shown(worker.log_path.parent)}/)")

    def _stop(self, finished: bool, *processes: Service) -> None:
        """Whatever happened: an error, Ctrl-C, or a stdout gone (`make demo | head`)."""
        say = self.stdout.write
        # A polling transport makes the worker's warm shutdown slow (~5 s on the filesystem
        # broker): say so first, or the demo looks stuck.
        with contextlib.suppress(OSError):
            if not finished:
                say("")  # end the line left open
            say("Stopping the relay and the worker (warm shutdown) ...", ending="")
            self.stdout.flush()
        took = sum(process.stop() for process in processes)
        with contextlib.suppress(OSError):
            say(f" stopped in {took:.1f} s.")

    def _sign_up(self) -> tuple[list[scenario.SignUp], scenario.SignUp]:
        say = self.stdout.write
        say(f"\nSigning users up, in this process (pid {os.getpid()}):")
        sign_ups = []
        with scenario.observe_commits() as committed:
            # First, so that its open transaction (on SQLite, a write lock) holds up no one.
            sign_ups.append(scenario.sign_up_with_the_command(*LINGERING_USER, "--linger", "1"))
            for username, email in WEB_USERS:
                sign_ups.append(scenario.sign_up_on_the_web(self.client, username, email))
            sign_ups.append(scenario.sign_up_with_the_command(*ROLLED_BACK_USER, "--dry-run"))
            rejected = scenario.sign_up_on_the_web(self.client, *durable.REJECTED_USER)
        width = max(len(s.username) for s in sign_ups)
        for sign_up in [*sign_ups, rejected]:
            sign_up.committed = committed.get(sign_up.username)
            say(f"  {sign_up.username:<{width}}  {sign_up.how}  ->  {sign_up.outcome}")
        return sign_ups, rejected

    def _compare(self, story: list[scenario.SignUp]) -> latency.Comparison:
        say = self.stdout.write
        inline = []
        with scenario.handlers_inline(), scenario.observe_commits() as committed:
            for username, email in INLINE_USERS:
                inline.append(scenario.sign_up_on_the_web(self.client, username, email))
        for sign_up in inline:
            sign_up.committed = committed.get(sign_up.username)
            say(f"  {sign_up.username:<5}  {sign_up.how}  ->  {sign_up.outcome} (handlers inline)")
        return latency.Comparison(inline, [s for s in story if s.response])
