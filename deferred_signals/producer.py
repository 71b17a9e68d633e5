"""One task message handed to a kombu producer as Celery's ``apply_async`` hands it.

:func:`publish_message` publishes a message the builder made (:mod:`messages`), once, without
retrying: Celery's ``before_task_publish``, ``after_task_publish`` and ``task_sent`` fire with
the arguments Celery gives them, each queue is declared once per channel, and on Redis the
message goes to the package's own push when it can (:mod:`redispush`).
:func:`publish_fallback` is the per-call path, ``apply_async`` itself.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import celery
from celery import signals as celery_signals
from kombu import Producer

from .messages import Message, summary

if TYPE_CHECKING:
    from .redispush import RedisPush

logger = logging.getLogger("deferred_signals")

#: Celery 5.7 passes before_task_publish the retry policy merged with its defaults.
_SIGNALS_GET_MERGED_POLICY = celery.VERSION >= (5, 7)


# Channels that have seen each queue declared: a new channel (a reconnection) declares again.
_declared: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()


def publish_message(
    producer: Producer,
    message: Message,
    *,
    timeout: float | None = None,
    confirm_timeout: float | None = None,
    push: RedisPush | None = None,
) -> None:
    """Publish ``message`` through ``producer`` once, without retrying (``retry=False``).

    Fires ``before_task_publish`` and ``after_task_publish`` as Celery does. Each queue of
    ``message.declare`` is declared the first time this producer's channel publishes to it.
    Errors propagate: the caller decides on retries and deadlines. With ``push`` (a Redis
    channel), the message is queued there when it can be, and written by ``push.flush()``.
    """
    before = celery_signals.before_task_publish
    # Celery's Signal.send returns at once without receivers: not even the call then.
    if before.receivers:
        # A receiver may change the body, headers and properties: they are encoded as they
        # stand after them.
        message.body_json = message.layout = None
        _receivers_raised(
            message,
            before,
            before.send(
                sender=message.task,
                body=message.body,
                exchange=message.exchange,
                routing_key=message.routing_key,
                declare=message.declare,
                headers=message.headers,
                properties=message.properties,
                # Celery < 5.7 hands receivers the retry_policy argument as given (none here).
                retry_policy=message.retry_policy if _SIGNALS_GET_MERGED_POLICY else None,
            ),
        )
    if message.declare:
        channel = producer.channel
        declared = _declared.get(channel)
        if declared is None:
            declared = _declared[channel] = set()
        for entity in message.declare:
            ident = hash(entity)
            if ident not in declared:
                producer.maybe_declare(entity, retry=False)
                declared.add(ident)
    if push is None or not push.add(message):
        kwargs = message.publish_kwargs()
        kwargs["declare"] = None
        kwargs["mandatory"] = True  # AMQP: returned if no queue takes it (see Confirms)
        producer.publish(message.body, timeout=timeout, confirm_timeout=confirm_timeout, **kwargs)
    after = celery_signals.after_task_publish
    if after.receivers:
        _receivers_raised(
            message,
            after,
            after.send(
                sender=message.task,
                body=message.body,
                headers=message.headers,
                exchange=message.exchange,
                routing_key=message.routing_key,
            ),
        )
    sent = celery_signals.task_sent
    if sent.receivers:  # Celery's deprecated signal, still sent by 5.x
        _receivers_raised(
            message,
            sent,
            sent.send(
                sender=message.task,
                task_id=message.headers["id"],
                task=message.task,
                args=message.body[0],
                kwargs=message.body[1],
                eta=message.headers["eta"],
                taskset=message.headers["group"],
            ),
        )


def _receivers_raised(message: Message, signal: Any, responses: Any) -> None:
    """Log each receiver of ``signal`` that raised while ``message`` was published.

    Celery's ``Signal.send`` catches a receiver's exception and logs it naming the receiver
    only, and ``apply_async`` publishes all the same: so do we. A receiver's failure changes
    nothing of what is published (it is no failure to publish: spilled, the call would be
    published twice), but the log names the handler and the call it happened for.
    """
    for receiver, response in responses or ():
        if isinstance(response, BaseException):
            logger.warning(
                "deferred_signals: a %s receiver, %s, raised %r while %s [%s] was published; "
                "the call is published all the same (as Celery's apply_async does)",
                getattr(signal, "name", None) or "Celery signal",
                _name(receiver),
                response,
                message.task,
                message.headers["id"],
            )


def _name(receiver: Any) -> str:
    qualname = getattr(receiver, "__qualname__", None)
    if qualname is None:
        return repr(receiver)
    return f"{getattr(receiver, '__module__', '?')}.{qualname}"


def publish_fallback(
    producer: Producer | None,
    task: Any,
    call_id: str,
    body: dict[str, Any],
    options: Mapping[str, Any],
    *,
    timeout: float | None = None,
    confirm_timeout: float | None = None,
) -> None:
    """The per-call path: ``Task.apply_async`` itself, once, without Celery's retry policy."""
    task.apply_async(
        kwargs=body,
        task_id=call_id,
        producer=producer,
        # Celery would saferepr() the whole tagged body: a short summary reads better too.
        argsrepr="()",
        kwargsrepr=summary(body),
        retry=False,
        timeout=timeout,
        confirm_timeout=confirm_timeout,
        **{**options, "mandatory": True},  # AMQP: returned if no queue takes it
    )
