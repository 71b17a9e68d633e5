"""Signals of our own, for metrics and alerts: each is sent in the process where it happens.

Every signal's ``sender`` is the user's handler function (the one decorated with
``receiver(..., defer=True)`` or given to ``connect()``), so a receiver can listen to one
handler with ``connect(receiver, sender=send_welcome_email)``: Django matches senders by
identity, which a name would not give. Every signal also carries ``handler`` (the registered
name, the label to use in metrics) and ``call_id`` (the same from the signal to the handler,
on every retry and replay). Times are aware UTC datetimes, durations are seconds.

With no receiver connected, ``Signal.send()`` returns at once (about a microsecond); the
request path checks ``receivers`` first and skips even that.

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
  which does not count against the handler's ``max_retries``).
- ``call_dead_lettered``: the call was kept as a dead letter (failed for good, stopped by its
  hard time limit or lost with its worker child and not redelivered, or a message the worker
  refused); ``exception``, ``attempts``. ``sender`` is ``None`` when the message names no
  handler registered in this process. A call the pool stopped is kept by the worker's main
  process, so the signal is sent there.
"""

from __future__ import annotations

from django.dispatch import Signal

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

call_deferred = Signal()
call_published = Signal()
call_spilled = Signal()
call_lost = Signal()
handler_started = Signal()
handler_succeeded = Signal()
handler_skipped = Signal()
handler_failed = Signal()
handler_retried = Signal()
call_dead_lettered = Signal()
