"""``manage.py demo``: sign users up while a real Celery worker runs the deferred handlers."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.test import Client

from demo import report, scenario, state
from demo.worker import Worker, WorkerError

LINGERING_USER = ("carol", "carol@example.com")
WEB_USERS = [("alice", "alice@example.com"), ("bob", "bob@example.com")]
ROLLED_BACK_USER = ("dave", "dave@example.com")
USERNAMES = [name for name, _ in [LINGERING_USER, *WEB_USERS, ROLLED_BACK_USER]]


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # By default SIGTERM/SIGHUP end Python without unwinding, which would leave the worker
    # running; as SystemExit they run the `finally` that stops it, as Ctrl-C does.
    raise SystemExit(128 + signum)


class Command(BaseCommand):
    help = (
        "Run the example end to end: a fresh database, a real celery worker, sign-ups through "
        "the web form and the register_user command, then what ran where, and when."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="Seconds to wait for the worker to start, then to finish (default 60).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _exit_on_signal)
        # The timeline below tells what the inline receiver logs; don't say it twice.
        logging.getLogger("accounts").setLevel(logging.WARNING)
        timeout: float = options["timeout"]
        say = self.stdout.write

        say("deferred_signals demo\n")
        done = state.reset_database(USERNAMES)
        say(f"  database  {state.describe_database()} ({done})")
        state.reset_broker()
        say(f"  broker    {state.describe_broker()}")
        mailbox = state.reset_mailbox()

        worker = Worker(settings.STATE_DIR / "worker.log")
        interrupted = 0  # the exit status, when a signal cut the demo short
        finished = False
        try:
            worker.start()
            say(f"  worker    `celery worker` started, pid {worker.pid} ...", ending="")
            self.stdout.flush()
            ready = worker.wait_until_ready(timeout)
            say(f" ready in {ready:.1f} s (log: {state.shown(worker.log_path)})")
            sign_ups = self._sign_up()
            say("\nWaiting for the worker to handle every deferred call ...", ending="")
            self.stdout.flush()
            say(f" done in {report.wait_for_worker(sign_ups, timeout):.1f} s.")
            finished = True
        except (WorkerError, TimeoutError) as error:
            log = worker.log_tail()
            raise CommandError(f"{error}\n--- the worker's log, last lines ---\n{log}") from error
        except KeyboardInterrupt:
            interrupted = 130
        except SystemExit as exit_:  # SIGTERM or SIGHUP, see _exit_on_signal
            interrupted = int(exit_.code or 1)
        finally:
            # Whatever happened: an error, Ctrl-C, or a stdout gone (`make demo | head`).
            # A polling transport makes the warm shutdown slow (~5 s on the filesystem
            # broker): say so first, or the demo looks stuck.
            with contextlib.suppress(OSError):
                if not finished:
                    say("")  # end the line left open
                say("Stopping the worker (warm shutdown) ...", ending="")
                self.stdout.flush()
            took = worker.stop()
            with contextlib.suppress(OSError):
                say(f" stopped in {took:.1f} s.")
        if interrupted:
            raise CommandError("Interrupted.", returncode=interrupted)
        if leftovers := worker.leftovers():
            raise CommandError(f"Worker processes were left running: {leftovers}")

        # Count messages, not files: Django's file backend names a file after the time and
        # id(backend), which two forked worker processes can share, and then appends to it.
        files = sorted(mailbox.glob("*")) if mailbox.is_dir() else []
        emails = sum(path.read_text().count("\nMessage-ID: ") for path in files)
        result = report.Report(sign_ups, state.shown(mailbox), emails)
        say("\nWhat happened, in order (t: seconds since the first sign-up):")
        for line in result.timeline():
            say(f"  {line}")
        say("\nSo:")
        for line in result.summary():
            say(f"  {line}")
        if problems := result.problems():
            raise CommandError("The demo saw something wrong:\n  " + "\n  ".join(problems))
        say(self.style.SUCCESS("\nOK: all of the above checked; no worker process left behind."))

    def _sign_up(self) -> list[scenario.SignUp]:
        say = self.stdout.write
        say(f"\nSigning users up, in this process (pid {os.getpid()}):")
        sign_ups = []
        client = Client(enforce_csrf_checks=True)
        with scenario.observe_commits() as committed:
            # First, so that its open transaction (on SQLite, a write lock) holds up no one.
            sign_ups.append(scenario.sign_up_with_the_command(*LINGERING_USER, "--linger", "1"))
            for username, email in WEB_USERS:
                sign_ups.append(scenario.sign_up_on_the_web(client, username, email))
            sign_ups.append(scenario.sign_up_with_the_command(*ROLLED_BACK_USER, "--dry-run"))
        width = max(len(s.username) for s in sign_ups)
        for sign_up in sign_ups:
            sign_up.committed = committed.get(sign_up.username)
            say(f"  {sign_up.username:<{width}}  {sign_up.how}  ->  {sign_up.outcome}")
        return sign_ups
