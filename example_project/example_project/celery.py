"""The project's Celery app, the standard Django recipe.

``celery -A example_project worker`` finds this app. Every deferred handler becomes a task of
it when Django loads the ``accounts`` app; nothing here has to name them.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
# Every CELERY_* Django setting configures Celery: CELERY_BROKER_URL -> broker_url, etc.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
