"""``manage.py deferred_handlers``: the former name of ``manage.py deferred_signals list``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from .deferred_signals import Command as DeferredSignalsCommand
from .deferred_signals import add_list_arguments


class Command(DeferredSignalsCommand):
    help = "Same as `manage.py deferred_signals list` (kept for existing scripts)."

    def add_arguments(self, parser: CommandParser) -> None:
        add_list_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        self.handle_list(**options)
