"""Django app configuration."""

from __future__ import annotations

from django.apps import AppConfig


class DeferredSignalsConfig(AppConfig):
    name = "deferred_signals"
    verbose_name = "Deferred signals"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        # Registers the system checks and Celery's worker_init check of task names.
        from . import checks, proxy

        proxy.OWN_MODELS.update(self.get_models())
        checks.connect_worker_check()
