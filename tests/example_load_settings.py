"""The example project's settings, as test_http_load runs it under gunicorn.

Only what a load run needs differs from ``example_project/settings.py``: a queue of the run's
own on the shared broker; stand-ins for the SMTP server and the CRM that answer at once and
never fail (their latency and retries would only lengthen the worker's drain, not the
requests); and persistent database connections, in the web processes and in the worker
(whose Django fixup otherwise reconnects for every task), as a production deployment has.
The database, the broker and ``DJANGO_DEBUG`` still come from the environment.
"""

from __future__ import annotations

import os

from example_project.settings import *  # noqa: F403
from example_project.settings import DATABASES, DEFERRED_SIGNALS

DATABASES["default"]["CONN_MAX_AGE"] = 60
CELERY_DB_REUSE_MAX = 1000
QUEUE = CELERY_TASK_DEFAULT_QUEUE = os.environ["DS_LOAD_QUEUE"]
DEFERRED_SIGNALS = {
    **DEFERRED_SIGNALS,
    "DEFAULTS": {**DEFERRED_SIGNALS["DEFAULTS"], "queue": QUEUE},
}
CRM_FAILURES_BEFORE_SUCCESS = 0
SMTP_LATENCY = CRM_LATENCY = 0.0
