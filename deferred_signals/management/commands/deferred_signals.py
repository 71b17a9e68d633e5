"""``manage.py deferred_signals <subcommand>``: the package's one command.

``list`` the handlers, ``status`` of the outbox and dead letters, ``relay`` the outbox to the
broker, ``replay`` dead letters, ``prune`` old bookkeeping rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections, router
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from deferred_signals import listing, readiness, registry
from deferred_signals.exceptions import DeferredSignalConfigError
from deferred_signals.outbox_status import not_due, outbox_state, pending
from deferred_signals.relay import Relay, RoundResult, freeze_heap

if TYPE_CHECKING:
    from collections.abc import Iterable

    from deferred_signals.models import DeadLetter

#: The largest dead letter id (a 64-bit integer): a longer number can only be a call id.
MAX_ID = 2**63 - 1
#: A relay loops every 5 s when idle; a long backlog or a broker timeout stretches a loop.
STALE_AFTER = "5m"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> datetime.timedelta:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or a number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 7d, 12h, 30m or 45s")
    return datetime.timedelta(seconds=float(match[1]) * UNITS[match[2] or "s"])


def shown(age: datetime.timedelta) -> str:
    """``age`` as :func:`duration` reads it, in its largest whole unit up to days: ``7d``,
    not ``7 days, 0:00:00`` (nor ``1w`` for the ``7d`` given)."""
    seconds = age.total_seconds()
    for unit in "dhm":
        size = UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:g}s"


def duration_option(text: str) -> datetime.timedelta:
    """:func:`duration` for argparse: its message, after the option's name."""
    try:
        return duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    """A count of 1 or more, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, not {text!r}")
    return value


def status_databases() -> tuple[list[str], list[str]]:
    """The aliases whose outbox ``status`` reports (they have the table and take writes),
    and those that may have it but did not answer."""
    from deferred_signals.models import OutboxCall

    ready, unreachable = [], []
    for alias in connections:
        if router.allow_migrate_model(alias, OutboxCall):
            state = outbox_state(alias)
            if state is None:
                unreachable.append(alias)
            elif state:
                ready.append(alias)
    return ready, unreachable


def add_list_arguments(parser: CommandParser) -> None:
    """The options of ``list``, also taken by its former name, ``deferred_handlers``."""
    parser.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    parser.add_argument(
        "--no-workers",
        action="store_true",
        help="Do not ask live workers which queues they consume.",
    )
    parser.add_argument(
        "--timeout", type=float, default=1.0, help="Seconds to wait for workers' replies."
    )


def add_common_arguments(parser: CommandParser) -> None:
    """Django's common options, also after the subcommand (``relay -v 2``): argparse leaves
    the arguments that follow a subcommand to its parser. Suppressed defaults, so the values
    given before the subcommand (or Django's defaults) stand when these are not repeated."""
    common: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("-v", "--verbosity"), {"type": int, "choices": [0, 1, 2, 3]}),
        (("--settings",), {}),
        (("--pythonpath",), {}),
        (("--traceback",), {"action": "store_true"}),
        (("--no-color",), {"action": "store_true"}),
        (("--force-color",), {"action": "store_true"}),
        (("--skip-checks",), {"action": "store_true"}),
    ]
    for flags, options in common:
        parser.add_argument(
            *flags, default=argparse.SUPPRESS, help="As before the subcommand.", **options
        )


class Command(BaseCommand):
    help = "Inspect and operate deferred signal handlers: list, status, relay, replay, prune."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True, parser_class=CommandParser)
        add_list_arguments(
            sub.add_parser("list", help="The handlers: signals, senders, merged options.")
        )

        status = sub.add_parser("status", help="Pending outbox rows, dead letters, relays.")
        status.add_argument("--json", action="store_true", help="Print JSON instead of text.")
        status.add_argument(
            "--stale-after",
            type=duration_option,
            default=duration(STALE_AFTER),
            help=f"A relay without a loop for this long is stale ({STALE_AFTER}).",
        )

        relay = sub.add_parser("relay", help="Publish the outbox until SIGTERM/SIGINT.")
        relay.add_argument("--once", action="store_true", help="Publish what is due, then exit.")
        relay.add_argument(
            "--database",
            action="append",
            dest="databases",
            help="Drain this alias's outbox (repeatable; default: every alias with the table).",
        )
        relay.add_argument("--batch", type=positive_int, default=500, help="Rows per round (500).")
        relay.add_argument(
            "--health-file",
            type=Path,
            help="Touch this file after each round and loop that did not fail (liveness probe).",
        )

        replay = sub.add_parser("replay", help="Publish dead letters again, same call ids.")
        replay.add_argument("ids", nargs="*", help="Dead letter ids (or call ids).")
        replay.add_argument("--handler", help="Every dead letter of this handler.")
        replay.add_argument("--all", action="store_true", help="Every dead letter.")
        replay.add_argument(
            "--include-replayed", action="store_true", help="Also letters replayed before."
        )
        replay.add_argument("--dry-run", action="store_true", help="Say what would be replayed.")

        prune = sub.add_parser(
            "prune", help="Delete processed call ids and replayed dead letters older than this."
        )
        prune.add_argument(
            "--older-than",
            type=duration_option,
            default=duration("7d"),
            help="Age past which rows are deleted: 45s, 30m, 12h, 7d, 2w (7d).",
        )
        for subparser in sub.choices.values():
            add_common_arguments(subparser)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["subcommand"] in ("relay", "replay"):
            try:  # they publish: refuse Celery's unconfigured fallback app, as a send would
                readiness.check()
            except DeferredSignalConfigError as error:
                raise CommandError(str(error)) from None
        getattr(self, f"handle_{options['subcommand']}")(**options)

    def handle_list(self, **options: Any) -> None:
        handlers = listing.handlers_report(
            workers=not options.get("no_workers"), timeout=options.get("timeout", 1.0)
        )
        if options["json"]:
            self.stdout.write(json.dumps(handlers, indent=2, default=str))
        else:
            listing.print_handlers(handlers, self.stdout, self.style)

    def handle_status(self, **options: Any) -> None:
        from deferred_signals.models import DeadLetter, RelayHeartbeat

        databases, unreachable = status_databases()
        letters = DeadLetter.objects.using(router.db_for_read(DeadLetter))
        report: dict[str, Any] = {
            "outbox": [pending(using) for using in databases],
            "unreachable_databases": unreachable,
            "dead_letters": {
                row["handler"]: row["count"]
                for row in letters.filter(replayed_at=None)
                .values("handler")
                .annotate(count=Count("id"))
                .order_by("handler")
            },
            "relays": {
                row.name: row.last_loop_at.isoformat()
                for using in databases
                for row in RelayHeartbeat.objects.using(using).order_by("-last_loop_at")
            },
        }
        # Stopped relays remove their row; a row left behind is a relay killed or stuck.
        now = timezone.now()
        report["stale_relays"] = sorted(
            name
            for name, at in report["relays"].items()
            if now - datetime.datetime.fromisoformat(at) > options["stale_after"]
        )
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self._print_status(report, now)
        if unreachable:
            # A report without a database's outbox must not pass for "nothing pending".
            raise CommandError(
                "outbox not read: database(s) that did not answer: " + ", ".join(unreachable)
            )

    def _print_status(self, report: dict[str, Any], now: datetime.datetime) -> None:
        for entry in report["outbox"]:
            age = entry["oldest_age_seconds"]
            oldest = f", oldest {age:.0f} s old" if age is not None else ""
            self.stdout.write(f"outbox {entry['database']}: {entry['pending']} pending{oldest}")
        for alias in report["unreachable_databases"]:
            self.stdout.write(f"outbox {alias}: did not answer")
        total = sum(report["dead_letters"].values())
        self.stdout.write(f"dead letters not replayed: {total}")
        for handler, count in report["dead_letters"].items():
            self.stdout.write(f"  {handler}: {count}")
        if not report["relays"]:
            # Read as "one is running, slowly" after a relay was stopped, with calls waiting.
            self.stdout.write(
                "relays: none running (a relay shows here once it completes a loop; "
                "relay --once never does)"
            )
        for name, at in report["relays"].items():
            seconds = (now - datetime.datetime.fromisoformat(at)).total_seconds()
            stale = ": stale (stopped or stuck)" if name in report["stale_relays"] else ""
            self.stdout.write(f"relay {name}: last loop {seconds:.0f} s ago{stale}")

    @staticmethod
    def _not_due(relay: Relay) -> str:
        """Rows left for later: without a word, "relayed 0" over a full outbox reads as a bug."""
        later = [not_due(alias) for alias in relay.databases if alias not in relay.failures]
        rows = sum(count for count, _ in later)
        if not rows:
            return ""
        first = min(wait for count, wait in later if count and wait is not None)
        return (
            f"; {rows} more not due yet, the first in {first:.0f} s (a call written inside a "
            "transaction is left OUTBOX_GRACE for its request to publish; a failed one backs off)"
        )

    def handle_relay(self, **options: Any) -> None:
        # Checked before the first round: afterwards these fail as tracebacks, or not at all.
        aliases = list(connections)
        for alias in options["databases"] or []:
            if alias not in aliases:
                raise CommandError(
                    f"--database {alias!r}: no such database alias in DATABASES "
                    f"({', '.join(aliases)})."
                )
        health_file = options["health_file"]
        if health_file is not None:
            directory = health_file.parent
            if not directory.is_dir():
                raise CommandError(
                    f"--health-file {health_file}: its directory {directory} does not exist."
                )
            if not os.access(directory, os.W_OK):
                raise CommandError(
                    f"--health-file {health_file}: its directory {directory} is not writable."
                )
        report = options["verbosity"] > 1

        def on_round(using: str, result: RoundResult) -> None:
            # A loop drains the whole backlog first (minutes, after a long outage): touched
            # only then, the file would look stale to a liveness probe, which would kill the
            # relay mid-drain and have its round published again. Only a round that
            # committed gets here: a failed one must not say the relay is healthy.
            if health_file is not None:
                health_file.touch()
            if report:
                self._report_round(using, result)

        relay = Relay(
            databases=options["databases"] or [],
            batch=options["batch"],
            health_file=health_file,
            on_round=on_round if health_file is not None or report else None,
        )
        if not relay.databases and not relay.unverified:
            raise CommandError(
                "No database has the outbox table: run `manage.py migrate` (and "
                "`migrate --database=ALIAS` for other aliases that send deferred calls)."
            )
        if options["once"]:
            published = relay.run_once()
            failed = {**{alias: None for alias in relay.unverified}, **relay.failures}
            # No heartbeat row: it would outlive this process and look like a stuck relay.
            # Nor a touch of the health file after a database failed: it means healthy.
            if relay.health_file is not None and not failed:
                relay.health_file.touch()
            self.stdout.write(f"relayed {published} call(s){self._not_due(relay)}")
            if failed:
                # For cron and CI: what is left of a failing database is not relayed.
                raise CommandError(
                    "not relayed: "
                    + "; ".join(
                        f"database {alias!r} ({error or 'did not answer'})"
                        for alias, error in failed.items()
                    )
                )
            return

        def stop(signum: int, frame: Any) -> None:
            self.stderr.write(f"received signal {signum}: finishing the round in hand")
            relay.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        waiting = f", waiting for {', '.join(relay.unverified)}" if relay.unverified else ""
        self.stdout.write(
            f"relaying the outbox of {', '.join(relay.databases) or 'no database yet'}"
            f"{waiting} (Ctrl-C to stop)"
        )
        freeze_heap()  # this process relays until it stops
        relay.run()
        relay.forget_heartbeat()  # a clean stop; a killed relay's row goes stale instead
        self.stdout.write("relay stopped")

    def _report_round(self, using: str, result: RoundResult) -> None:
        if result.published or result.failed_rows:
            self.stdout.write(
                f"{using}: published {result.published}, failed {result.failed_rows}, "
                f"dead-lettered {result.dead_lettered}"
            )

    def handle_replay(self, **options: Any) -> None:
        from deferred_signals.models import DeadLetter
        from deferred_signals.replay import replay

        letters: Iterable[DeadLetter]
        chosen = DeadLetter.objects.using(router.db_for_read(DeadLetter)).order_by("id")
        if options["all"] or options["handler"]:
            if options["handler"] and not options["all"]:
                name = options["handler"]
                chosen = chosen.filter(handler=name)
                if registry.get(name) is None and not chosen.exists():
                    # As for IDS: a typo must not pass for "nothing to do".
                    raise CommandError(
                        f"--handler {name!r}: no deferred handler is registered under this "
                        "name and no dead letter names it: nothing replayed."
                    )
            if not options["include_replayed"]:
                chosen = chosen.filter(replayed_at=None)
            letters = chosen
        elif options["ids"]:
            letters = self._named_letters(chosen, options["ids"])
        else:
            raise CommandError("Say which dead letters: IDs, --handler NAME or --all.")
        replayed, skipped = replay(letters, dry_run=options["dry_run"])
        verb = "would replay" if options["dry_run"] else "replayed"
        for letter in replayed:
            self.stdout.write(f"{verb} {letter.id}: {letter.handler} [{letter.call_id}]")
        for skip in skipped:
            letter = skip.letter
            self.stderr.write(
                f"skipped {letter.id}: {letter.handler} [{letter.call_id}]: {skip.reason}"
            )
        self.stdout.write(f"{verb} {len(replayed)} dead letter(s), skipped {len(skipped)}")

    @staticmethod
    def _named_letters(letters: QuerySet[DeadLetter], ids: list[str]) -> list[DeadLetter]:
        """The letters ``ids`` name (ids or call ids, replayed before or not), or a
        CommandError naming those that name none: a typo must not pass for "nothing to do"."""
        numbers = {int(i) for i in ids if i.isdigit() and int(i) <= MAX_ID}
        found = list(letters.filter(Q(id__in=numbers) | Q(call_id__in=ids)))
        known = {letter.call_id for letter in found}
        pks = {letter.pk for letter in found}
        missing = [i for i in ids if i not in known and not (i.isdigit() and int(i) in pks)]
        if missing:
            raise CommandError(
                f"No dead letter has the id or call id {', '.join(map(repr, missing))}: "
                "nothing replayed."
            )
        return found

    def handle_prune(self, **options: Any) -> None:
        from deferred_signals.models import DeadLetter, ProcessedCall, RelayHeartbeat

        cutoff = timezone.now() - options["older_than"]
        processed = heartbeats = 0
        databases, unreachable = status_databases()
        for using in databases:
            old = ProcessedCall.objects.using(using).filter(processed_at__lt=cutoff)
            processed += old.delete()[0]
            gone = RelayHeartbeat.objects.using(using).filter(last_loop_at__lt=cutoff)
            heartbeats += gone.delete()[0]
        letters = (
            DeadLetter.objects.using(router.db_for_write(DeadLetter))
            .filter(replayed_at__lt=cutoff)
            .delete()[0]
        )
        self.stdout.write(
            f"pruned {processed} processed call id(s) and {letters} replayed dead letter(s) "
            f"older than {shown(options['older_than'])}"
        )
        self.stdout.write(
            f"pruned {heartbeats} relay heartbeat(s) without a loop for "
            f"{shown(options['older_than'])} "
            "(relays killed or stuck)"
        )
        if unreachable:  # for cron: what they hold is not pruned
            raise CommandError(
                "not pruned: database(s) that did not answer: " + ", ".join(unreachable)
            )
