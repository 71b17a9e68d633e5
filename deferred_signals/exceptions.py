"""Exceptions raised by deferred_signals."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


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
