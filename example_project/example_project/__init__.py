"""The example project: a Django site whose signal handlers run on a Celery worker."""

from __future__ import annotations

# Load the Celery app whenever Django starts, so the deferred handlers' tasks bind to it
# (they are created with shared_task semantics) in web processes and commands alike.
from .celery import app as celery_app

__all__ = ["celery_app"]
