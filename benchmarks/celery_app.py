"""The benchmark's Celery app, configured from Django settings like a real project's."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")

# DjangoTask gives every task ``delay_on_commit``, one of the idioms measured here.
app = Celery("benchmarks", task_cls="celery.contrib.django.task:DjangoTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
