"""``manage.py demo_admin``: the example's superuser, for the admin (``make runserver``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from demo import state


class Command(BaseCommand):
    help = (
        "Create the superuser 'admin' (or give it a new password) and print its password; "
        "EXAMPLE_ADMIN_PASSWORD chooses it. Only with DEBUG on: this is a demo's account."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEBUG:
            self.stdout.write("DEBUG is off: no demo admin; use `manage.py createsuperuser`.")
            return
        password = state.ensure_admin()
        self.stdout.write(
            f"Admin: http://127.0.0.1:8000/admin/  user {state.ADMIN_USERNAME!r}, "
            f"password {password!r}"
        )
