"""Settings for the PostgreSQL layer and the end-to-end tests with a real worker.

The worker processes started by the tests use these settings too, with the test database
names and the broker passed through the environment (``DS_TEST_DB_*``, ``DS_TEST_BROKER``).
"""

from __future__ import annotations

import os

from .settings import *  # noqa: F403
from .settings import DEFERRED_SIGNALS

_pg = {
    "ENGINE": "django.db.backends.postgresql",
    "HOST": os.environ.get("DS_PGHOST", "127.0.0.1"),
    "PORT": os.environ.get("DS_PGPORT", "5432"),
    "USER": os.environ.get("DS_PGUSER", "postgres"),
    "PASSWORD": os.environ.get("DS_PGPASSWORD", ""),
}
DATABASES = {
    "default": {**_pg, "NAME": os.environ.get("DS_TEST_DB_DEFAULT", "deferred_signals")},
    "other": {**_pg, "NAME": os.environ.get("DS_TEST_DB_OTHER", "deferred_signals_other")},
}
# Fault tests: the worker reaches the default database through a proxy of the tests' own
# (tests/test_worker_faults.py), and keeps its dead letters on the other one, which stays up.
# DS_TEST_PG_CONNECT_TIMEOUT="" leaves libpq's default (none), as most projects do.
if os.environ.get("DS_TEST_PG_PORT_DEFAULT"):
    DATABASES["default"]["PORT"] = os.environ["DS_TEST_PG_PORT_DEFAULT"]
    if connect_timeout := os.environ.get("DS_TEST_PG_CONNECT_TIMEOUT", "3"):
        DATABASES["default"]["OPTIONS"] = {"connect_timeout": int(connect_timeout)}
if os.environ.get("DS_TEST_DEADLETTER_DB"):
    DATABASE_ROUTERS = ["tests.routers.DeadLetterRouter"]
# A project with a read replica (tests/test_operations.py): reads go to "replica", the
# default database in a read-only session, as a standby answers.
if os.environ.get("DS_TEST_REPLICA"):
    DATABASES["replica"] = {
        **DATABASES["default"],
        "OPTIONS": {"options": "-c default_transaction_read_only=on"},
    }
    DATABASE_ROUTERS = ["tests.routers.PrimaryReplicaRouter"]

_defaults: dict[str, object] = {"queue": os.environ.get("DS_TEST_QUEUE", "deferred-signals-tests")}
if os.environ.get("DS_TEST_DB_RETRY_WINDOW"):
    _defaults["db_retry_window"] = float(os.environ["DS_TEST_DB_RETRY_WINDOW"])
DEFERRED_SIGNALS = {
    **DEFERRED_SIGNALS,
    "EAGER": os.environ.get("DS_TEST_EAGER", "1") == "1",
    "DEFAULTS": _defaults,
}
# A worker whose hard time limits requeue the message instead of acknowledging it
# (tests/test_worker_lost.py).
if os.environ.get("DS_TEST_REQUEUE_TIMEOUTS"):
    CELERY_TASK_ACKS_ON_TIMEOUT = False
# A Redis worker that redelivers a message unacknowledged for this many seconds, and looks
# for such messages every second (tests/test_worker_faults.py).
if os.environ.get("DS_TEST_VISIBILITY_TIMEOUT"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": float(os.environ["DS_TEST_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
