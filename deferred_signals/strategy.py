"""The first look a worker takes at a message for a deferred handler, before Celery's own.

Celery unpacks a task message in the worker's main process, and pickles its arguments for a
prefork child; some bodies make either step raise there (a body that is not the
``[args, kwargs, embed]`` list, arguments nested a few hundred levels deep), which ends the
whole worker, and every restart after it, since the message goes back to the queue. Each
handler task's :class:`~celery.app.task.Task.Strategy` checks the message first; one it
refuses is rejected without requeue, logged once at ERROR and kept as a dead letter.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.utils import uuid
from celery.worker.strategy import default as default_strategy
from kombu.exceptions import ContentDisallowed

from . import deadletters, letter_writer
from .codec import MAX_DEPTH
from .exceptions import MalformedMessageError
from .execution import MESSAGE_KEYS, OPTIONAL_KEYS

logger = logging.getLogger("deferred_signals")

#: MAX_DEPTH for an argument, inside Celery's list, our body and its kwargs object.
MESSAGE_DEPTH = MAX_DEPTH + 3
#: Headers Celery reads before the task runs; their value types, when present and not None.
HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "retries": int,
    "timelimit": (list, tuple),
    "shadow": str,
    "root_id": str,
    "parent_id": str,
    # Request.revoked() iterates these in the main process for a message with "expires".
    "stamped_headers": (list, tuple),
    "stamps": dict,
}


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy behind a check of each message (``Task.Strategy``)."""
    handle = default_strategy(task, app, consumer, **kwargs)
    connection_errors = consumer.connection_errors

    def task_message_handler(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **options: Any
    ) -> Any:
        reason = message_problem(message)
        if reason is None:
            return handle(message, body, ack, reject, callbacks, **options)
        refuse(task.name, message, reason)
        reject(logger, connection_errors)  # without requeue: it would come straight back
        signals.task_rejected.send(
            sender=consumer, message=message, exc=MalformedMessageError(reason)
        )
        return None

    return task_message_handler


def message_problem(message: Any) -> str | None:
    """Why a message cannot be one of ours, or None. Never raises."""
    headers = message.headers
    if not isinstance(headers, dict):
        return "no task headers (only Celery's message protocol 2 is accepted)"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "no task id"
    for key, kind in HEADER_TYPES.items():
        value = headers.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"header {key!r} is a {type(value).__name__}"
    timelimit = headers.get("timelimit")
    if timelimit is not None and (
        len(timelimit) != 2
        or not all(limit is None or isinstance(limit, numbers.Real) for limit in timelimit)
    ):
        return f"header 'timelimit' is {timelimit!r:.80}"
    stamped = headers.get("stamped_headers")
    if stamped is not None and not all(isinstance(name, str) for name in stamped):
        return "header 'stamped_headers' holds a name that is not a string"
    if too_deep(headers, MAX_DEPTH):
        return f"headers nest deeper than {MAX_DEPTH} levels"
    # Celery copies the properties (on Redis, any JSON the envelope carries) into the request
    # it pickles for a prefork child, delivery_info included: bounded like the headers.
    if too_deep(getattr(message, "properties", None), MAX_DEPTH):
        return f"message properties nest deeper than {MAX_DEPTH} levels"
    try:
        payload = message.payload
    except ContentDisallowed:
        raise  # the consumer rejects a content type it does not accept, and says so
    except Exception as error:  # any decoding failure: a bad message
        return f"the body does not decode: {error!r:.200}"
    if type(payload) not in (list, tuple) or len(payload) != 3:
        return f"the body is a {type(payload).__name__}, not Celery's [args, kwargs, embed]"
    args, kwargs, embed = payload
    if args:
        return "positional arguments are not accepted"
    if type(args) is not list or type(kwargs) is not dict:
        return "args must be a list and kwargs an object"
    if embed is not None and type(embed) is not dict:
        return f"embed is a {type(embed).__name__}"
    if embed and any(value is not None for value in embed.values()):
        # We never send callbacks, errbacks, chains or chords: such a message would make the
        # worker run other tasks inline.
        return "embed carries callbacks, errbacks, a chain or a chord"
    # The task checks each key in depth; this bounds what the pool has to carry.
    if not MESSAGE_KEYS <= kwargs.keys() <= MESSAGE_KEYS | OPTIONAL_KEYS:
        return f"unexpected message fields {sorted(map(str, kwargs))!r:.200}"
    if too_deep(payload, MESSAGE_DEPTH):
        return f"arguments nest deeper than {MAX_DEPTH} levels"
    return None


def too_deep(value: Any, limit: int) -> bool:
    """Whether lists and objects nest more than ``limit`` deep (iterative: no recursion).

    Walks one level at a time, keeping only the containers: it runs on every message.
    """
    level = [value] if type(value) in _CONTAINERS else []
    depth = 1
    while level:
        if depth > limit:
            return True
        below: list[Any] = []
        for item in level:
            children = item.values() if type(item) is dict else item
            below += [child for child in children if type(child) in _CONTAINERS]
        level = below
        depth += 1
    return False


_CONTAINERS = (dict, list, tuple)


def refuse(task_name: str, message: Any, reason: str) -> None:
    """Log a refused message once, and keep it as a dead letter."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    call_id = headers.get("id")
    if not isinstance(call_id, str) or not call_id:
        call_id = f"no-id-{uuid()}"
    logger.error("Rejected message %s for deferred handler task %s: %s", call_id, task_name, reason)
    try:
        body: Any = message.payload
        if type(body) in (list, tuple) and len(body) == 3 and type(body[1]) is dict:
            body = body[1]  # the call's own body, as a replay would publish it
        text = deadletters.body_text(body)
    except Exception:  # undecodable, or too deep to encode again
        raw = message.body
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    # Off the event loop: a hung database must not stop the worker.
    letter_writer.keep(
        call_id=call_id,
        handler=task_name,
        body=text,
        exception=MalformedMessageError(reason),
        attempts=0,
    )
