"""A router for the fault tests: dead letters on another database than the one cut off."""

from __future__ import annotations

import os
from typing import Any


class DeadLetterRouter:
    def db_for_write(self, model: type[Any], **hints: Any) -> str | None:
        if model._meta.label == "deferred_signals.DeadLetter":
            return os.environ["DS_TEST_DEADLETTER_DB"]
        return None
