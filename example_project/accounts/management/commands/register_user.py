"""``manage.py register_user NAME EMAIL``: sign a user up from the command line."""

from __future__ import annotations

import time
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from accounts.forms import RegistrationForm
from accounts.services import register_user


class Command(BaseCommand):
    help = "Register a user, sending post_save and user_registered like the sign-up page."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("email")
        parser.add_argument(
            "--linger",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="Keep the transaction open this long after the signals are sent, to watch "
            "the worker wait for the commit.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Roll the transaction back at the end: the inline receiver runs, the "
            "deferred ones are never sent.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        form = RegistrationForm({"username": options["username"], "email": options["email"]})
        if not form.is_valid():
            raise CommandError(_errors(form.errors.as_data()))
        # register_user() has its own atomic block; this outer one lets --linger and
        # --dry-run decide when (and whether) the whole registration commits.
        with transaction.atomic():
            data = form.cleaned_data
            user = register_user(data["username"], data["email"], source="cli")
            if options["linger"]:
                time.sleep(options["linger"])
            if options["dry_run"]:
                transaction.set_rollback(True)
        if options["dry_run"]:
            self.stdout.write(f"Rolled back the registration of {user.username} (--dry-run).")
        else:
            self.stdout.write(f"Registered {user.username} <{user.email}> (id {user.pk}).")


def _errors(errors: dict[str, list[ValidationError]]) -> str:
    return "; ".join(
        f"{field}: {' '.join(message for error in field_errors for message in error.messages)}"
        for field, field_errors in errors.items()
    )
