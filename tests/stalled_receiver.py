"""A ``handler_started`` receiver that hangs (a metrics backend that does not answer), for a
real worker started with ``DS_TEST_WORKER_IMPORTS`` naming this module: it holds the run of
``soft_overrun`` past that handler's soft time limit, before the handler starts."""

from __future__ import annotations

import time
from typing import Any

from deferred_signals import signals

STALLED = "tests.testapp.handlers.soft_overrun"


def stall(sender: Any, handler: str, **kwargs: Any) -> None:
    if handler == STALLED:
        time.sleep(5)


signals.handler_started.connect(stall, weak=False)
