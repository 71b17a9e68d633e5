"""The benchmark's Django app: one model, the handlers of every idiom measured."""

from __future__ import annotations

from django.apps import AppConfig


class BenchConfig(AppConfig):
    name = "benchmarks.benchapp"
    label = "benchapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Tasks must exist (and the probe codec be registered) before the first publish.
        import os

        from . import handlers

        if os.environ.get("DS_BENCH_WORKER") == "1":  # a worker started by benchmarks.endtoend
            handlers.register_e2e()
