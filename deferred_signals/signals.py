"""Signals of our own, for metrics and alerts: each is sent in the process where it happens.

Every signal's ``sender`` is the user's handler function (the one decorated with
``receiver(..., defer=True)`` or given to ``connect()``), so a receiver can listen to one
handler with ``connect(receiver, sender=send_welcome_email)``: Django matches senders by
identity, which a name would not give. Every signal also carries ``handler`` (the registered
name, the label to use in metrics) and ``call_id`` (the same from the signal to the handler,
on every retry and replay). Times are aware UTC datetimes, durations are seconds.

With no receiver connected, ``Signal.send()`` returns at once (about a microsecond); the
request path checks ``receivers`` first and skips even that.

A receiver that raises changes nothing for the call: ``send()`` calls every receiver, as
``send_robust()`` does, and logs the failure (the signal, handler and call id at ERROR, the
traceback at DEBUG).

Request side (and the relay, and replays):

- ``call_deferred``: a deferred handler received a signal; the call waits for the commit.
  ``using`` (the database whose commit releases it), ``delivery`` (``"on_commit"`` or
  ``"outbox"``).
- ``call_published``: the broker confirmed the call. ``committed_at`` (``None`` if unknown),
  ``published_at``, ``seconds`` (commit to confirmation; ``None`` if unknown).
- ``call_spilled``: the call could not be published and waits in the outbox for the relay.
  ``error`` (the broker's exception).
- ``call_lost``: the call could not be published and the outbox write failed too: it is gone
  (logged at ERROR with its id). ``error`` (the broker's exception).

Worker side (and inline with ``EAGER``):

- ``handler_started``: ``attempt`` (1 for the first run), ``committed_at``, ``latency``
  (seconds from the commit to this start, ``None`` if unknown).
- ``handler_succeeded``: ``attempt``, ``duration``.
- ``handler_skipped``: the handler did not run; ``attempt``, ``reason``: ``"duplicate"`` (an
  ``idempotent`` handler already processed this call) or ``"missing"`` (a row it needs is
  gone, ``on_missing="skip"``).
- ``handler_failed``: the handler raised; ``attempt``, ``exception``, ``duration``, ``final``
  (False when a retry follows, then ``handler_retried`` is sent too).
- ``handler_retried``: a retry is scheduled; ``attempt`` (the attempt that failed),
  ``exception``, ``countdown`` (seconds), ``database`` (True for a database-outage retry,
  which does not count against the handler's ``max_retries``). Sent alone for an outage met
  decoding the message (a codec's ``decode()``), before the handler started.
- ``call_dead_lettered``: the call was kept as a dead letter (failed for good, stopped by its
  hard time limit or lost with its worker child and not redelivered, or a message the worker
  refused); ``exception``, ``attempts``. ``sender`` is ``None`` when the message names no
  handler registered in this process. A call the pool stopped is kept by the worker's main
  process, so the signal is sent there.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from django.dispatch import Signal

logger = logging.getLogger("deferred_signals")

__all__ = [
    "call_dead_lettered",
    "call_deferred",
    "call_lost",
    "call_published",
    "call_spilled",
    "handler_failed",
    "handler_retried",
    "handler_skipped",
    "handler_started",
    "handler_succeeded",
]


class _Signal(Signal):
    """A signal whose receivers cannot change what happens to a call.

    Metrics code that raises must not stop a handler from running, turn its success into a
    failure (retried, or kept as a dead letter and run twice on replay), nor drop a call
    before it is queued for its commit: ``send()`` is ``send_robust()``, and logs. But for
    Celery's soft time limit, which is the running task's wherever billiard raises it.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def send(self, sender: Any, **named: Any) -> list[tuple[Any, Any]]:
        responses = self.send_robust(sender, **named)
        expired = None
        for receiver, response in responses:
            if isinstance(response, SoftTimeLimitExceeded):
                # Dropped, it let the handler start, or go on, with no time limit but the
                # hard one, which kills the child.
                expired = response
            elif isinstance(response, Exception):
                # The exception's text, which may quote the call's arguments, at DEBUG only.
                kind = type(response)
                logger.error(
                    "deferred_signals: a %s receiver (%s) failed for %s [%s]: %s.%s",
                    self.name,
                    _name(receiver),
                    named.get("handler"),
                    named.get("call_id"),
                    kind.__module__,
                    kind.__qualname__,
                )
                logger.debug(
                    "deferred_signals: the %s receiver's failure", self.name, exc_info=response
                )
        if expired is not None:
            raise expired
        return responses

    def _log_robust_failure(self, receiver: Any, err: Exception) -> None:
        # Not Django's line on django.dispatch: under Django's default LOGGING it mails the
        # ADMINS, once a call, from the commit, the exception's text in the subject; and it
        # names receiver.__qualname__, which a partial or a callable object lacks (the
        # AttributeError left send()). send() logs.
        return


def _name(receiver: Any) -> str:
    return getattr(receiver, "__qualname__", None) or repr(receiver)


call_deferred = _Signal("call_deferred")
call_published = _Signal("call_published")
call_spilled = _Signal("call_spilled")
call_lost = _Signal("call_lost")
handler_started = _Signal("handler_started")
handler_succeeded = _Signal("handler_succeeded")
handler_skipped = _Signal("handler_skipped")
handler_failed = _Signal("handler_failed")
handler_retried = _Signal("handler_retried")
call_dead_lettered = _Signal("call_dead_lettered")
