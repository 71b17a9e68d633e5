"""A plain Celery task, not a deferred handler: the worker serves other tasks as well."""

from __future__ import annotations

import os
import time

from celery import shared_task

from .models import Record


@shared_task(name="tests.plain_task")
def plain_task(label: str) -> None:
    Record.objects.create(
        handler="plain_task", call={"label": label}, pid=os.getpid(), ran_at=time.time()
    )
