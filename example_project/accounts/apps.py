from __future__ import annotations

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts"

    def ready(self) -> None:
        # Connect the receivers. In a worker this also registers the deferred handlers, which
        # is how the worker knows what it may run (it never imports names from messages).
        from . import receivers  # noqa: F401
