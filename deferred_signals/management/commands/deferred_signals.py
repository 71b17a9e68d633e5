"""``manage.py deferred_signals <subcommand>``: the package's one command."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from deferred_signals import listing


class Command(BaseCommand):
    help = "Inspect and operate deferred signal handlers. Subcommands: list."

    def add_arguments(self, parser: CommandParser) -> None:
        subcommands = parser.add_subparsers(dest="subcommand", required=True)
        listing_ = subcommands.add_parser(
            "list", help="The deferred handlers: signals, senders and merged options."
        )
        listing_.add_argument("--json", action="store_true", help="Print JSON instead of text.")
        listing_.add_argument(
            "--no-workers",
            action="store_true",
            help="Do not ask live workers which queues they consume.",
        )
        listing_.add_argument(
            "--timeout", type=float, default=1.0, help="Seconds to wait for workers' replies."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"handle_{options['subcommand']}")(**options)

    def handle_list(self, **options: Any) -> None:
        handlers = listing.handlers_report(
            workers=not options.get("no_workers"), timeout=options.get("timeout", 1.0)
        )
        if options["json"]:
            self.stdout.write(json.dumps(handlers, indent=2, default=str))
        else:
            listing.print_handlers(handlers, self.stdout, self.style)
