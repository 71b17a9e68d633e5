"""Run Django signal handlers as Celery tasks, after the transaction commits.

from deferred_signals import receiver

@receiver(post_save, sender=User, defer=True)
def send_welcome_email(sender, instance, created, **kwargs): ...
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import signals
from .calls import DeferredCall, current_call
from .codec import register_codec, unregister_codec
from .exceptions import (
    DeferredSignalConfigError,
    DeferredSignalError,
    DuplicateHandlerError,
    MalformedMessageError,
)
from .receivers import connect, receiver

try:
    __version__ = version("deferred-signals")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "DeferredCall",
    "DeferredSignalConfigError",
    "DeferredSignalError",
    "DuplicateHandlerError",
    "MalformedMessageError",
    "__version__",
    "connect",
    "current_call",
    "receiver",
    "register_codec",
    "signals",
    "unregister_codec",
]
