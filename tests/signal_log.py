"""Our signals as a real worker's pool processes send them, appended to a file for the test.

A worker started with ``DS_TEST_SIGNAL_LOG=<path>`` and ``DS_TEST_WORKER_IMPORTS`` naming this
module records every signal of ours, one JSON object a line: its name, handler, call id and
attempt. ``DS_TEST_SIGNAL_RAISE`` names signals whose receiver, connected first, raises, as a
broken metrics receiver would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deferred_signals import signals

ENV = "DS_TEST_SIGNAL_LOG"
RAISE_ENV = "DS_TEST_SIGNAL_RAISE"


class BrokenReceiverError(Exception):
    """What a broken metrics receiver raises."""


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_to(path: str, raising: list[str]) -> Callable[[], None]:
    """Connect the receivers (the raising ones first); return what disconnects them."""
    connected: list[tuple[Any, Callable[..., None]]] = []
    for name in signals.__all__:

        def record(sender: Any, _name: str = name, **kwargs: Any) -> None:
            event = {
                "name": _name,
                "handler": kwargs.get("handler"),
                "call_id": kwargs.get("call_id"),
                "attempt": kwargs.get("attempt"),
                "final": kwargs.get("final"),
                "pid": os.getpid(),
            }
            with open(path, "a") as file:  # one write a line: pool processes share the file
                file.write(json.dumps(event) + "\n")

        def broken(sender: Any, _name: str = name, **kwargs: Any) -> None:
            raise BrokenReceiverError(f"a broken {_name} receiver")

        signal = getattr(signals, name)
        for receiver in [broken, record] if name in raising else [record]:
            signal.connect(receiver, weak=False)
            connected.append((signal, receiver))

    def disconnect() -> None:
        for signal, receiver in connected:
            signal.disconnect(receiver)

    return disconnect


if os.environ.get(ENV):
    record_to(os.environ[ENV], [name for name in os.environ.get(RAISE_ENV, "").split(",") if name])
