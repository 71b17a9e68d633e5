"""Settings for the fast layers: unit tests and database tests on SQLite (EAGER delivery)."""

from __future__ import annotations

import os

SECRET_KEY = "tests-only"
USE_TZ = True
TIME_ZONE = "Europe/Paris"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    # The live server of the browser test serves the admin's CSS and JavaScript.
    "django.contrib.staticfiles",
    "deferred_signals",
    "tests.testapp",
]
# The admin (dead letters, outbox) is tested through real requests.
ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
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
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    "other": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}
DATABASE_ROUTERS: list[str] = []

# The Celery app (tests/celery_app.py) reads CELERY_* settings.
CELERY_BROKER_URL = os.environ.get("DS_TEST_BROKER", "memory://")
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

DEFERRED_SIGNALS = {
    "EAGER": True,
    # Roomier than the default 2 s: a 1,000-call batch on a loaded 2-core machine may take
    # longer, and spill for a relay these tests do not run. The fault tests set 2 s back.
    "PUBLISH_TIMEOUT": 10,
    "HANDLERS": {
        "tests.testapp.handlers.flaky": {
            "autoretry_for": ["tests.testapp.handlers.FlakyError"],
            "max_retries": 3,
            "default_retry_delay": 0,
        },
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"deferred_signals": {"handlers": ["console"], "level": "INFO"}},
}

# Django 6.1's mailers (ignored before it): without them, sending email warns that Django
# 2028 will have no default mailer, an error under the matrix's -W error. Tests swap in the
# memory backend anyway.
MAILERS = {"default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}
