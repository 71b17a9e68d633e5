"""``current_call()``: which deferred call the running handler serves."""

from __future__ import annotations

import datetime
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeferredCall:
    """The deferred call a handler is running for.

    ``id`` is the same from the signal to the handler, on every retry, redelivery and replay:
    store it to make a handler idempotent. ``attempt`` is 1 for the first run and grows by one
    with each retry. ``committed_at`` is when the transaction that sent the signal committed
    (``None`` when the message does not say).
    """

    id: str
    handler: str
    attempt: int
    committed_at: datetime.datetime | None


#: Set (True) on a handler's exception that leaves its task once the call failed for good and
#: was dealt with (logged, kept as a dead letter): under Celery's ``task_always_eager`` with
#: ``task_eager_propagates`` it reaches the publisher, which must not take it for a failure
#: to publish (the call ran).
HANDLER_FAILED = "deferred_signals_handler_failed"


def mark_handler_failed(error: BaseException) -> None:
    with suppress(AttributeError, TypeError):  # an exception that takes no attributes
        setattr(error, HANDLER_FAILED, True)


_current: ContextVar[DeferredCall | None] = ContextVar("deferred_call", default=None)
#: The message body of the running call (private: the proxy compares the rows of two calls).
_body: ContextVar[dict[str, Any] | None] = ContextVar("deferred_call_body", default=None)


def current_call() -> DeferredCall | None:
    """The call the running deferred handler serves; ``None`` outside a deferred handler.

    Works on the worker and inline with ``EAGER``::

        @receiver(post_save, sender=Order, defer=True)
        def notify(sender, instance, **kwargs):
            call = current_call()
            if Notification.objects.filter(call_id=call.id).exists():
                return  # a second delivery of the same call
    """
    return _current.get()


class running:
    """Make ``current_call()`` answer for the duration of one handler run (a class, not a
    ``@contextmanager``: it runs for every message on the worker)."""

    __slots__ = ("body", "body_token", "call", "token")

    def __init__(self, call_id: str, handler: str, attempt: int, body: dict[str, Any]) -> None:
        self.call = DeferredCall(call_id, handler, attempt, committed_at(body))
        self.body = body

    def __enter__(self) -> DeferredCall:
        self.token = _current.set(self.call)
        self.body_token = _body.set(self.body)
        return self.call

    def __exit__(self, *exc_info: object) -> None:
        _body.reset(self.body_token)
        _current.reset(self.token)


def running_body() -> dict[str, Any] | None:
    """The message body of the call the running deferred handler serves, if any."""
    return _body.get()


def committed_at(body: dict[str, Any]) -> datetime.datetime | None:
    at = body.get("at")
    if at is None:
        return None
    return datetime.datetime.fromtimestamp(at, tz=datetime.timezone.utc)
