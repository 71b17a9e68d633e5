"""The Celery app of the test project, configured from Django settings like a real project."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings_postgres")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
if os.environ.get("DS_TEST_WORKER_IMPORTS"):  # modules one test's own worker imports too
    app.conf.imports = tuple(os.environ["DS_TEST_WORKER_IMPORTS"].split(","))

if os.environ.get("DS_TEST_OTEL_SPANS"):  # the tracing tests' worker
    from tests.otel import ENV, trace_worker_to

    trace_worker_to(os.environ[ENV])

if os.environ.get("DS_TEST_SENTRY_EVENTS"):  # the Sentry tests' worker
    from tests.sentry_capture import ENV as SENTRY_ENV
    from tests.sentry_capture import report_worker_to

    report_worker_to(os.environ[SENTRY_ENV])
