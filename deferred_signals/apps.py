"""Django app configuration."""

from __future__ import annotations

from django.apps import AppConfig


class DeferredSignalsConfig(AppConfig):
    name = "deferred_signals"
    verbose_name = "Deferred signals"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        # Registers the system checks, the worker's receivers of Celery's task_failure and
        # task_unknown and its worker_init check of task names; nothing else happens at
        # start-up.
        from . import checks, lost_calls, proxy, unregistered  # noqa: F401

        proxy.OWN_MODELS.update(self.get_models())
        checks.connect_worker_check()
