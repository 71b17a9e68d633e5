"""Exceptions raised by deferred_signals."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError


class DeferredSignalError(TypeError):
    """Base class: a deferred handler cannot be registered, sent or run as asked.

    It subclasses ``TypeError`` because the common case is an argument whose type
    cannot travel to a worker; the message always names the handler, the argument
    and the fix.
    """


class DeferredSignalConfigError(DeferredSignalError, ImproperlyConfigured):
    """``receiver(..., defer=True)`` options or ``settings.DEFERRED_SIGNALS`` are invalid."""


class DuplicateHandlerError(DeferredSignalConfigError):
    """Two different functions were registered under one handler name."""


class MalformedMessageError(DeferredSignalError):
    """A message reached a handler task that this code base could not have sent.

    The worker logs it at ERROR, rejects the message without retrying and carries on.
    """


class BrokerUnavailable(DeferredSignalError):
    """The broker failed recently: calls are spilled without trying it until the cooldown ends."""


class PublishTimeout(DeferredSignalError):
    """Publishing ran past ``PUBLISH_TIMEOUT``: the calls not yet confirmed are spilled.

    ``broker_answering``: the broker confirmed everything sent so far, the batch was just too
    big for the time allowed; that is no outage, so no cooldown follows.
    """

    def __init__(self, message: str, broker_answering: bool = False) -> None:
        super().__init__(message)
        self.broker_answering = broker_answering


class PublishRefused(DeferredSignalError):
    """The broker answered a publish with a refusal (a ``basic.nack``, Redis's ``WRONGTYPE``
    for a queue's key): it is up, so the refused calls are spilled without a cooldown."""

    broker_answering = True
    #: Ids of the calls of the batch after the refused one that the broker took all the same.
    published_after: frozenset[str] = frozenset()
    #: The id of the first call refused, when the broker's answer says which.
    refused_call: str | None = None


class OutboxWriteError(DeferredSignalError, DatabaseError):
    """A ``delivery="outbox"`` call could not be written to the outbox of its database.

    Raised from the send, or from the statement or the commit before which the waiting rows
    were written; the transaction then does not commit. It is also a ``DatabaseError``, as
    the failed INSERT is one.
    """
