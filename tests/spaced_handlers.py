"""A handler whose name holds spaces (any str is a name), imported by one test's worker."""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal

from deferred_signals import receiver

spaced_signal = Signal()


# A rate_limit too: ``inspect registered`` lists such a task as "name [rate_limit=...]".
@receiver(spaced_signal, defer=True, name="tests spaced handler", rate_limit="100/s")
def spaced(sender: Any, **kwargs: Any) -> None:
    """Nothing to do: ``list`` only asks whether the worker imported it."""
