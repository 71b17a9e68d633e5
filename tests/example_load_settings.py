"""The example project's settings, as test_http_load runs it under gunicorn.

Only what a load run needs differs from ``example_project/settings.py``: a queue of the run's
own on the shared broker, a CRM that never fails (its retries would only lengthen the drain),
and what a production deployment would set: no DEBUG, persistent database connections, in
the web processes and in the worker (whose Django fixup otherwise reconnects for every task).
The database and the broker still come from ``DATABASE_URL`` and ``BROKER``.
"""

from __future__ import annotations

import os

from example_project.settings import *  # noqa: F403
from example_project.settings import DATABASES

DEBUG = False
DATABASES["default"]["CONN_MAX_AGE"] = 60
CELERY_DB_REUSE_MAX = 1000
CELERY_TASK_DEFAULT_QUEUE = os.environ["DS_LOAD_QUEUE"]
CRM_FAILURES_BEFORE_SUCCESS = 0
