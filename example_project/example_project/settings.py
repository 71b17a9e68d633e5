"""Settings of the example project.

SQLite and a serverless broker by default, so ``make demo`` needs nothing but Python. The
environment switches it to real services and to production settings, with the same code:

- ``DATABASE_URL``: ``postgres://USER:PASSWORD@HOST:PORT/NAME`` (or ``sqlite:///PATH``);
- ``BROKER``: any Celery broker URL, e.g. ``redis://127.0.0.1:6379/0`` or
  ``amqp://guest:guest@127.0.0.1:5672//``;
- ``DJANGO_SECRET_KEY``, ``DJANGO_DEBUG`` (``1``/``0``), ``DJANGO_ALLOWED_HOSTS`` (comma
  separated): demo defaults, and with ``DJANGO_DEBUG=0`` a secret key of your own is required;
- ``EXAMPLE_SMTP_LATENCY``, ``EXAMPLE_CRM_LATENCY``: seconds the stand-ins for the SMTP server
  and the CRM take to answer (0.3 and 0.4 by default, what such services usually take).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
# Everything the demo writes (database, broker folders, emails) lives in the repository's
# git-ignored .demo/ folder, so `make clean` or `rm -rf .demo` resets it all.
STATE_DIR = Path(os.environ.get("DEMO_STATE_DIR") or BASE_DIR.parent / ".demo").resolve()


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={value!r}: use 1 or 0.")


def env_seconds(name: str, default: float) -> float:
    try:
        seconds = float(os.environ.get(name) or default)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number of seconds.") from None
    if seconds < 0:
        raise ImproperlyConfigured(f"{name} must not be negative.")
    return seconds


DEMO_SECRET_KEY = "example-project-only-never-use-in-production"
DEBUG = env_flag("DJANGO_DEBUG", default=True)
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or DEMO_SECRET_KEY
if not DEBUG and SECRET_KEY == DEMO_SECRET_KEY:
    raise ImproperlyConfigured(
        "DJANGO_DEBUG=0 needs a secret key of your own: set DJANGO_SECRET_KEY, e.g. to the "
        "output of `python -c 'import secrets; print(secrets.token_urlsafe(50))'`."
    )
# "testserver" is the host of django.test.Client, which `manage.py demo` signs users up with.
ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")
    if host.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "deferred_signals",
    "accounts",
    "demo",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "static/"
# `manage.py collectstatic` gathers the admin's files here for a production web server.
STATIC_ROOT = STATE_DIR / "static"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


def database_from_url(url: str) -> dict[str, Any]:
    """A ``DATABASES`` entry from a URL: twenty lines instead of a dependency."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")) or "deferred_signals_demo",
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "OPTIONS": dict(parse_qsl(parts.query)),  # e.g. ?sslmode=require
        }
    if parts.scheme == "sqlite":
        return sqlite_database(Path(unquote(parts.path)))
    raise ImproperlyConfigured(
        f"DATABASE_URL={url!r}: use postgres://USER:PASSWORD@HOST:PORT/NAME or sqlite:///PATH."
    )


def sqlite_database(path: Path) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": path,
        "OPTIONS": {
            # The web process and the worker's processes write to one file at once: WAL lets
            # readers and the writer overlap, IMMEDIATE takes the write lock up front (no
            # "database is locked" half-way through a transaction), and the timeout waits
            # for the lock instead of failing.
            "init_command": "PRAGMA journal_mode=WAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        },
    }


DATABASES = {
    "default": (
        database_from_url(os.environ["DATABASE_URL"])
        if os.environ.get("DATABASE_URL")
        else sqlite_database(STATE_DIR / "db.sqlite3")
    )
}

# --- Celery (read by example_project/celery.py under the CELERY namespace) -----------------

CELERY_BROKER_URL = os.environ.get("BROKER") or "filesystem://localhost//"
if CELERY_BROKER_URL.startswith("filesystem://"):
    # The default broker is kombu's filesystem transport: one file per message in a folder.
    # It ships with Celery (no server, no extra package), survives the processes that use it
    # (unlike memory://, which a separate worker process cannot see), and since kombu 5.3
    # supports fanout exchanges, so the worker's remote control (`celery inspect`) works.
    # The transport polls the folder; 0.1 s keeps the demo snappy at negligible CPU cost.
    # ("localhost" in the URL means nothing to it, but spares us kombu's "No hostname was
    # supplied" warning.)
    _BROKER_DIR = STATE_DIR / "broker"
    # kombu's transport, but a message file appears only once written whole (its consumer
    # could read a file still empty: see fsbroker.py).
    CELERY_BROKER_TRANSPORT = "example_project.fsbroker:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
        # Producers write where consumers read: one folder is the queue store.
        "data_folder_in": str(_BROKER_DIR / "queues"),
        "data_folder_out": str(_BROKER_DIR / "queues"),
        "control_folder": str(_BROKER_DIR / "control"),
        "polling_interval": 0.1,
    }
    # The transport does not create its folders, and every process may be the first one.
    for _folder in ("queues", "control"):
        (_BROKER_DIR / _folder).mkdir(parents=True, exist_ok=True)

# The project's own queue, named for its work, so the example never eats (or is eaten by)
# another project's tasks on a shared Redis or RabbitMQ. Workers consume it by name:
# `celery --app example_project worker --queues accounts` (what `make worker` runs).
QUEUE = "accounts"
CELERY_TASK_DEFAULT_QUEUE = QUEUE

# `manage.py demo` cuts the broker under the web side and the relay, never under the worker:
# it gives them a way to the broker of its own (demo/outage.py), a folder link for the
# filesystem transport or a loopback TCP proxy for a broker URL. Unset outside the demo.
PUBLISH_VIA = os.environ.get("DEMO_PUBLISH_VIA", "")
if PUBLISH_VIA and CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_out"] = PUBLISH_VIA
elif PUBLISH_VIA:
    CELERY_BROKER_WRITE_URL = PUBLISH_VIA

CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# --- deferred_signals -------------------------------------------------------------------------

DEFERRED_SIGNALS: dict[str, Any] = {
    "DEFAULTS": {
        "queue": QUEUE,
        # Acknowledge a message once its handler has finished, not when it starts: a worker
        # that dies half-way leaves the call on the queue for another worker.
        "acks_late": True,
        "max_retries": 3,
    },
    "HANDLERS": {
        # The CRM is flaky (see accounts/crm.py): retry its sync with exponential backoff,
        # 1 s, 2 s, 4 s... Jitter is off only so the demo's delays are predictable.
        "accounts.receivers.sync_to_crm": {
            "autoretry_for": ["accounts.crm.CRMUnavailable"],
            "max_retries": 5,
            "retry_backoff": True,
            "retry_backoff_max": 60,
            "retry_jitter": False,
        },
    },
}

# How many times the fake CRM fails for each new contact before it accepts one.
CRM_FAILURES_BEFORE_SUCCESS = 2
# Seconds the stand-ins take to answer, as the services they stand for do: an SMTP server
# accepting a message, a CRM's HTTP API (accounts/mail.py, accounts/crm.py).
SMTP_LATENCY = env_seconds("EXAMPLE_SMTP_LATENCY", 0.3)
CRM_LATENCY = env_seconds("EXAMPLE_CRM_LATENCY", 0.4)

# --- email: written to files (after SMTP_LATENCY), so the welcome emails can be read ---------

EMAIL_BACKEND = "accounts.mail.EmailBackend"
EMAIL_FILE_PATH = STATE_DIR / "sent_emails"
DEFAULT_FROM_EMAIL = "welcome@example.com"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        # propagate=False: a Celery worker also logs the root logger; print each line once.
        "accounts": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "deferred_signals": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
