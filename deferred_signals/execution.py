"""A message back into a handler call, and running it (on the worker, or inline with ``EAGER``).

Everything a message says is checked against what this code base could have sent: its shape,
the values (``decoder.py``), the sender the handler is connected for and, for Django's model
signals, an ``instance`` of the sender model. Anything else is a :class:`MalformedMessageError`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from asgiref.sync import async_to_sync
from django.apps import apps
from django.core.exceptions import ObjectDoesNotExist
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, models, transaction
from django.db.models.signals import (
    ModelSignal,
    post_delete,
    post_init,
    post_save,
    pre_delete,
    pre_save,
)
from django.dispatch import Signal

from . import signals, tracing
from .calls import running
from .decoder import Decoder, _InstanceRef, resolve, snapshot_instance
from .exceptions import MalformedMessageError
from .fetch import fetch
from .registry import Handler

logger = logging.getLogger("deferred_signals")

MESSAGE_VERSION = 1
MESSAGE_KEYS = frozenset({"v", "signal", "sender", "kwargs"})
#: Keys a message may carry besides: "at", when the call's transaction committed (epoch
#: seconds, for ``current_call()``); "dbf", when the worker first met a database outage
#: (epoch seconds) and "dbr", how many retries that outage has cost so far.
OPTIONAL_KEYS = frozenset({"at", "dbf", "dbr"})
#: Signals whose ``instance`` is always an instance of their sender model.
INSTANCE_SIGNALS = (pre_save, post_save, pre_delete, post_delete, post_init)
#: Epoch seconds a message may carry: 0 to the year 5138.
_MAX_TIMESTAMP = 1e11


class DecodedCall:
    """A handler call read back from a message, ready to run."""

    def __init__(
        self,
        handler: Handler,
        signal: Signal,
        decoder: Decoder,
        sender: Any,
        kwargs: Any,
        body: dict[str, Any],
    ):
        self.handler = handler
        self.signal = signal
        self.decoder = decoder
        self.sender = sender
        self.kwargs = kwargs
        self.body = body
        #: When the current run started (``time.monotonic()``), for durations.
        self.started = 0.0

    def run(self, call_id: str, attempt: int = 1, *, final: bool = True) -> bool:
        """Fetch the instances, call the handler; False when it was skipped (a missing row,
        or an ``idempotent`` handler that already processed this call).

        Sends ``handler_started`` and ``handler_succeeded``/``handler_skipped``, and with
        ``final`` (no retry can follow, as inline) ``handler_failed`` when the handler raises;
        the worker, which decides on retries, calls :meth:`failed` itself.
        """
        with running(call_id, self.handler.name, attempt, self.body) as call:
            self.started = time.monotonic()
            at = self.body.get("at")
            signals.handler_started.send(
                self.handler.func,
                handler=self.handler.name,
                call_id=call_id,
                attempt=attempt,
                committed_at=call.committed_at,
                latency=None if at is None else max(0.0, time.time() - at),
            )
            tracing.annotate(self.handler.name, call_id, attempt)
            try:
                ran = self._run(call_id, attempt)
            except Exception as exc:
                if final:
                    self.failed(call_id, attempt, exc, final=True)
                raise
            if ran:
                signals.handler_succeeded.send(
                    self.handler.func,
                    handler=self.handler.name,
                    call_id=call_id,
                    attempt=attempt,
                    duration=time.monotonic() - self.started,
                )
            return ran

    def serving(self, call_id: str, attempt: int) -> running:
        """``current_call()`` answering for this run again: for the receivers of the signals
        the worker sends once the handler has raised (``handler_failed``, ``handler_retried``)."""
        return running(call_id, self.handler.name, attempt, self.body)

    def failed(self, call_id: str, attempt: int, exc: BaseException, *, final: bool) -> None:
        """Send ``handler_failed`` for this run."""
        with self.serving(call_id, attempt):
            signals.handler_failed.send(
                self.handler.func,
                handler=self.handler.name,
                call_id=call_id,
                attempt=attempt,
                exception=exc,
                duration=time.monotonic() - self.started,
                final=final,
            )

    def _skipped(self, call_id: str, attempt: int, reason: str) -> bool:
        signals.handler_skipped.send(
            self.handler.func,
            handler=self.handler.name,
            call_id=call_id,
            attempt=attempt,
            reason=reason,
        )
        return False

    def _run(self, call_id: str, attempt: int) -> bool:
        if not self.handler.merged.get("idempotent"):
            return self._call(call_id, attempt)
        from .models import ProcessedCall  # models load once Django's apps are ready

        using = self.handler.using or DEFAULT_DB_ALIAS
        with transaction.atomic(using=using):
            try:
                with transaction.atomic(using=using):
                    # A concurrent delivery of the same id waits here for this one's
                    # transaction, then fails the insert and skips.
                    ProcessedCall.objects.using(using).create(
                        call_id=call_id, handler=self.handler.name
                    )
            except IntegrityError:
                logger.info(
                    "Skipped deferred handler %s: call %s was already processed (idempotent=True).",
                    self.handler.name,
                    call_id,
                )
                return self._skipped(call_id, attempt, "duplicate")
            return self._call(call_id, attempt)

    def _call(self, call_id: str, attempt: int) -> bool:
        missing = self._resolve_instances()
        if missing is not None:
            logger.warning(
                "Skipped deferred handler %s: call %s: %s with pk=%r no longer exists in "
                "database %r (on_missing=%r).",
                self.handler.name,
                call_id,
                missing.model._meta.label,
                missing.pk,
                missing.db,
                self.handler.merged.get("on_missing"),
            )
            return self._skipped(call_id, attempt, "missing")
        func = self.handler.func
        if self.handler.is_async:  # an async receiver: awaited, as Django's asend would
            func = async_to_sync(func)
        func(signal=self.signal, sender=resolve(self.sender), **resolve(self.kwargs))
        return True

    def _resolve_instances(self) -> _InstanceRef | None:
        """Look up (or rebuild) every instance; the first whose row is gone and that
        ``on_missing="skip"`` skips the call for, if any. Silent: skipping is the caller's."""
        for ref in self.decoder.instances:
            if not ref.fresh:
                ref.resolved = snapshot_instance(ref)
                continue
            try:
                ref.resolved = fetch(ref.model, ref.db, ref.pk)
            except ObjectDoesNotExist:
                policy = self.handler.merged.get("on_missing")
                if policy == "raise":
                    raise
                if policy == "snapshot" and ref.fields is not None:
                    ref.resolved = snapshot_instance(ref)
                    continue
                return ref
        return None


def decode_call(handler: Handler, body: Any) -> DecodedCall:
    """Check a message's shape and decode it; anything unexpected is a malformed message."""
    if type(body) is not dict or body.keys() - OPTIONAL_KEYS != MESSAGE_KEYS:
        keys = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise MalformedMessageError(f"unexpected message fields {keys}")
    if body["v"] != MESSAGE_VERSION:
        raise MalformedMessageError(f"unsupported message version {body['v']!r}")
    for key in ("at", "dbf"):
        value = body.get(key)
        if value is not None and not _timestamp(value):
            raise MalformedMessageError(f"{key!r} is not a time: {value!r:.40}")
    retries = body.get("dbr", 0)
    if type(retries) is not int or retries < 0:
        raise MalformedMessageError(f"'dbr' is not a count: {retries!r:.40}")
    index, kwargs = body["signal"], body["kwargs"]
    if type(index) is not int or not 0 <= index < len(handler.signals):
        raise MalformedMessageError(f"signal index {index!r} is not one of the handler's signals")
    if type(kwargs) is not dict:
        raise MalformedMessageError("kwargs must be an object")
    for key in kwargs:
        if not key.isidentifier() or key in ("signal", "sender"):
            raise MalformedMessageError(f"invalid argument name {key!r}")
    signal = handler.signals[index]
    decoder = Decoder()
    sender = decoder.decode(body["sender"])
    decoded = {key: decoder.decode(value) for key, value in kwargs.items()}
    _check_sender(handler, signal, sender)
    if signal in INSTANCE_SIGNALS:
        _check_instance(sender, decoded.get("instance"))
    return DecodedCall(handler, signal, decoder, sender, decoded, body)


def _timestamp(value: Any) -> bool:
    return type(value) in (int, float) and 0 <= value < _MAX_TIMESTAMP  # NaN fails both


def _check_sender(handler: Handler, signal: Signal, sender: Any) -> None:
    """The sender must be one the handler is connected for (any, when one connection has none).

    Values a handler connected without ``sender=`` may receive are bounded by the decoder:
    classes only when they are models of installed apps or have a registered codec.
    """
    allowed = [known for one, known, _ in handler.connections if one is signal]
    if not allowed or any(known is None for known in allowed):
        return
    for known in allowed:
        if isinstance(known, str) and isinstance(signal, ModelSignal):
            try:  # a lazy "app_label.ModelName" sender, as ModelSignal resolves it
                known = apps.get_model(known)
            except (LookupError, ValueError):
                continue
        if sender is known or (
            not isinstance(known, type) and not isinstance(sender, (type, _InstanceRef))
            and sender == known
        ):  # fmt: skip
            return
    raise MalformedMessageError(
        f"sender {_describe(sender)} is not one deferred handler {handler.name!r} is connected for"
    )


def _check_instance(sender: Any, instance: Any) -> None:
    if not (isinstance(sender, type) and issubclass(sender, models.Model)):
        raise MalformedMessageError(f"a model signal's sender {_describe(sender)} is not a model")
    if not isinstance(instance, _InstanceRef) or not issubclass(instance.model, sender):
        raise MalformedMessageError(
            f"instance {_describe(instance)} is not an instance of {sender._meta.label}"
        )


def _describe(value: Any) -> str:
    if isinstance(value, _InstanceRef):
        return f"<{value.model._meta.label} pk={value.pk!r}>"
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return f"{value!r:.60}"


def close_connections() -> None:
    """Drop this thread's database connections: the next use opens fresh ones.

    A connection inside an ``atomic`` block is left alone: whoever opened the block (a test
    running the task with ``apply()``) owns it, and its rollback handles the failure.
    """
    for connection in connections.all(initialized_only=True):
        if connection.in_atomic_block:
            continue
        with contextlib.suppress(Exception):  # a broken connection is gone either way
            connection.close()
