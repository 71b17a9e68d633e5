"""Routers for test processes started with settings of their own (tests/settings_postgres.py)."""

from __future__ import annotations

import os
from typing import Any


class DeadLetterRouter:
    def db_for_write(self, model: type[Any], **hints: Any) -> str | None:
        if model._meta.label == "deferred_signals.DeadLetter":
            return os.environ["DS_TEST_DEADLETTER_DB"]
        return None


class PrimaryReplicaRouter:
    """Django's primary/replica example: every read from the replica, every write to default."""

    def db_for_read(self, model: type[Any], **hints: Any) -> str:
        return "replica"

    def db_for_write(self, model: type[Any], **hints: Any) -> str:
        return "default"

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return db != "replica"
