"""A clean slate for each demo run: database, broker queue and mailbox."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from deferred_signals.models import DeadLetter, OutboxCall
from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connection, connections

from accounts.models import AuditLog
from example_project.celery import app

#: The registered names of the example's deferred handlers start so.
HANDLERS_PREFIX = "accounts.receivers."


def within_state_dir(path: Path) -> bool:
    """Whether ``path`` is the demo's own to delete (under ``.demo/``)."""
    return Path(path).resolve().is_relative_to(settings.STATE_DIR)


def describe_database() -> str:
    db = settings.DATABASES["default"]
    if connection.vendor == "sqlite":
        return f"SQLite, {shown(Path(db['NAME']))}"
    return f"{connection.display_name} {db['NAME']!r} on {db.get('HOST') or 'localhost'}"


def describe_broker() -> str:
    url = app.connection_for_read().as_uri()  # the password masked; the worker's way in
    if url.startswith("filesystem://"):
        folder = shown(Path(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]).parent)
        return f"{url} (kombu's filesystem transport, no server: a file per message in {folder}/)"
    return url


def reset_database(usernames: list[str]) -> str:
    """Migrate a fresh database; returns what was done, for the report.

    The demo's own SQLite file is deleted and created anew. Any other database (a
    ``DATABASE_URL``) is created if missing, migrated, and only the demo's users and their
    audit entries are removed from it.
    """
    db = settings.DATABASES["default"]
    if connection.vendor == "sqlite" and within_state_dir(Path(db["NAME"])):
        connections.close_all()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db['NAME']}{suffix}").unlink(missing_ok=True)
        done = "new database"
    elif connection.vendor == "postgresql" and _create_postgres_database(db["NAME"]):
        done = "database created"
    else:
        done = "existing database; the previous demo's users removed"
    call_command("migrate", verbosity=0)
    User.objects.filter(username__in=usernames).delete()
    AuditLog.objects.filter(username__in=usernames).delete()
    # The example's own calls left by an earlier run: its dead letters, its outbox rows.
    for model in (DeadLetter, OutboxCall):
        model.objects.filter(handler__startswith=HANDLERS_PREFIX).delete()
    return done


def _create_postgres_database(name: str) -> bool:
    """Create the database unless it exists; whether it was created."""
    # Django's own way in when the database may not exist: through the "postgres" database.
    with connection._nodb_cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if cursor.fetchone() is not None:
            return False
        cursor.execute(f"CREATE DATABASE {connection.ops.quote_name(name)}")
        return True


def reset_broker() -> int:
    """Empty the example's queue, so calls left by an earlier run cannot muddle this one."""
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {})
    if app.conf.broker_url.startswith("filesystem://"):
        # Also drops bindings left by killed workers (the transport never forgets them).
        broker_dir = Path(options["data_folder_in"]).parent
        if within_state_dir(broker_dir):
            shutil.rmtree(broker_dir, ignore_errors=True)
        for key in ("data_folder_in", "data_folder_out", "control_folder"):
            Path(options[key]).mkdir(parents=True, exist_ok=True)
    return app.control.purge()


def reset_mailbox() -> Path:
    mailbox = Path(settings.EMAIL_FILE_PATH)
    if within_state_dir(mailbox):
        shutil.rmtree(mailbox, ignore_errors=True)
    return mailbox


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it: shorter, and what users type."""
    try:
        return str(path.resolve().relative_to(settings.BASE_DIR.parent.resolve()))
    except ValueError:
        return str(path)


ADMIN_USERNAME = "admin"


def ensure_admin() -> str:
    """Create the ``admin`` superuser, or give it a new password; returns the password.

    ``EXAMPLE_ADMIN_PASSWORD`` chooses it; otherwise it is new and random on every call, and
    printed: the example's database is a demo's, never a place for a password you chose.
    """
    password = os.environ.get("EXAMPLE_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    hashed = make_password(password)
    # Neither creates nor saves a model instance, so no post_save: the admin account is no
    # sign-up, and gets no welcome email.
    admins = User.objects.filter(username=ADMIN_USERNAME)
    if not admins.update(password=hashed, is_staff=True, is_superuser=True, is_active=True):
        User.objects.bulk_create(
            [
                User(
                    username=ADMIN_USERNAME,
                    email="admin@example.com",
                    password=hashed,
                    is_staff=True,
                    is_superuser=True,
                )
            ]
        )
    return password
