"""Django settings of the benchmark: PostgreSQL and Redis on loopback, nothing else.

Everything is overridable through the environment so the benchmark can run against other
local services without editing files.
"""

from __future__ import annotations

import os

PG_HOST = os.environ.get("DS_BENCH_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DS_BENCH_PGPORT", "5432"))
PG_USER = os.environ.get("DS_BENCH_PGUSER", "postgres")
PG_PASSWORD = os.environ.get("DS_BENCH_PGPASSWORD", "")
PG_DATABASE = os.environ.get("DS_BENCH_PGDATABASE", "deferred_signals_bench")

REDIS_HOST = os.environ.get("DS_BENCH_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("DS_BENCH_REDIS_PORT", "6379"))
# A database number of its own and a queue of its own: the benchmark purges and deletes only
# its own keys, but a dedicated number keeps it away from the test suite's db 0.
REDIS_DB = int(os.environ.get("DS_BENCH_REDIS_DB", "13"))
QUEUE = os.environ.get("DS_BENCH_QUEUE", "deferred-signals-bench")

SECRET_KEY = "benchmark-only"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["deferred_signals", "benchmarks.benchapp"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": PG_HOST,
        "PORT": PG_PORT,
        "USER": PG_USER,
        "PASSWORD": PG_PASSWORD,
        "NAME": PG_DATABASE,
        # One connection for the whole run, as in a long-lived web worker.
        "CONN_MAX_AGE": None,
    },
}

CELERY_BROKER_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
CELERY_TASK_DEFAULT_QUEUE = QUEUE
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
# The e2e workers (ours and the plain task alike) keep their database connection across
# tasks, as the production guide advises: without it Celery's Django fixup closes it after
# every task, and opening a PostgreSQL connection per task hides everything else.
# DS_BENCH_DB_REUSE_MAX=0 measures Celery's default.
CELERY_DB_REUSE_MAX = int(os.environ.get("DS_BENCH_DB_REUSE_MAX", "100")) or None

DEFERRED_SIGNALS = {"DEFAULTS": {"queue": QUEUE}, "EAGER": False}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # A publish failure is logged, not raised, by deferred_signals: show it.
    "loggers": {"deferred_signals": {"handlers": ["console"], "level": "WARNING"}},
}
