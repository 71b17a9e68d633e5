"""Run Django signal handlers as Celery tasks, after the transaction commits.

from deferred_signals import receiver

@receiver(post_save, sender=User, defer=True)
def send_welcome_email(sender, instance, created, **kwargs): ...
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import signals
    from .calls import DeferredCall, current_call
    from .codec import register_codec, unregister_codec
    from .exceptions import (
        DeferredSignalConfigError,
        DeferredSignalError,
        DuplicateHandlerError,
        MalformedMessageError,
        OutboxWriteError,
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
    "OutboxWriteError",
    "__version__",
    "connect",
    "current_call",
    "receiver",
    "register_codec",
    "signals",
    "unregister_codec",
]

#: Where each public name lives. Imported on first use: the pytest plugin (an entry point,
#: loaded by every pytest run) imports this package, and must not import Django with it.
_EXPORTS = {
    "DeferredCall": ".calls",
    "current_call": ".calls",
    "DeferredSignalConfigError": ".exceptions",
    "DeferredSignalError": ".exceptions",
    "DuplicateHandlerError": ".exceptions",
    "MalformedMessageError": ".exceptions",
    "OutboxWriteError": ".exceptions",
    "connect": ".receivers",
    "receiver": ".receivers",
    "register_codec": ".codec",
    "signals": ".",  # the module deferred_signals.signals itself
    "unregister_codec": ".codec",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = (
        import_module(f".{name}", __name__)
        if module == "."
        else getattr(import_module(module, __name__), name)
    )
    globals()[name] = value
    return value
