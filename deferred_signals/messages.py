"""Celery task messages built without ``Task.apply_async``, and their publishing.

``apply_async`` redoes per message what is constant per handler: merging the task's
options, routing through ``task_routes``, resolving the queue, its exchange and delivery
mode, and declaring the queue. A :class:`MessageBuilder` resolves all that once per
handler and its publish options, then builds each message as a copy of a template: the
same protocol-v2 headers, properties and body ``apply_async`` produces, so any Celery
worker, Flower and ``celery inspect`` read it (the routes: :mod:`routing`).
:func:`deferred_signals.producer.publish_message` hands it to a producer.

What the builder cannot resolve once, it refuses (``build`` returns ``None``) and the call
takes the per-call path, :func:`deferred_signals.producer.publish_fallback`, which is
``apply_async`` itself:

- ``task_routes`` holding anything but a mapping (a router function or class, or a dotted
  path to one): a function may look at the arguments, so it is asked on every call;
- ``task_always_eager``, ``task_send_sent_event``, a task that stores results
  (``ignore_result=False``), or a call made while a worker runs a task (Celery then takes
  the root and parent ids, and possibly the priority, from that task);
- a countdown on an AMQP broker with quorum queues (Celery's native delayed delivery
  routes each message through a routing key computed from its countdown).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from celery.utils import time as celery_time
from celery.utils.time import maybe_make_aware
from kombu import Queue

from . import routing
from .codec import JSON, TAG


def _add_seconds(dt: datetime, seconds: float) -> datetime:
    return dt + timedelta(seconds=seconds)


# Celery >= 5.6 adds in UTC, across daylight saving changes; the builder adds as Celery does.
_add: Callable[[datetime, float], datetime] = getattr(
    celery_time, "add_seconds_to_datetime", _add_seconds
)

__all__ = ["Message", "MessageBuilder"]

#: What ``apply_async(argsrepr=..., kwargsrepr=...)`` also puts among a message's properties,
#: and the builder leaves out: the headers carry both, which is where workers, Flower and
#: ``celery inspect`` read them; py-amqp drops unknown properties on the wire.
PROPERTIES_LEFT_OUT = ("argsrepr", "kwargsrepr")


@dataclass(slots=True)
class Message:
    """One task message, as ``Task.apply_async`` would hand it to ``Producer.publish``.

    ``headers`` and ``properties`` are this message's own: ``before_task_publish``
    receivers may change them before they are sent.
    """

    task: str
    body: tuple[tuple[()], dict[str, Any], dict[str, Any]]
    headers: dict[str, Any]
    properties: dict[str, Any]
    #: A name, or a kombu ``Exchange`` (Celery's default exchange for a non-direct queue).
    exchange: Any
    routing_key: str | None
    #: What Celery declares before publishing (the queue), as its publish signals see it.
    declare: list[Queue] | None
    delivery_mode: Any
    serializer: str
    compression: str | None
    retry_policy: dict[str, Any]
    #: The JSON of ``body`` as kombu's encoder writes it, when known without encoding it:
    #: valid while ``body`` is left as built (see ``publish_message``).
    body_json: str | None = None
    #: What the builder made the message from: ``(route, headers, properties)``. While
    #: ``headers`` and ``properties`` are those very dicts, left as built, a Redis push writes
    #: the message from a JSON template of the route instead of encoding them (see
    #: ``RedisPush.add``). None once anything may change them in place (a
    #: ``before_task_publish`` receiver, Sentry's trace headers: see ``publish_message`` and
    #: ``sentry._traced``).
    layout: tuple[Any, dict[str, Any], dict[str, Any]] | None = None

    def publish_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Producer.publish``, the body aside, as Celery passes them."""
        return {
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "serializer": self.serializer,
            "compression": self.compression,
            "retry": False,
            "retry_policy": self.retry_policy,
            "delivery_mode": self.delivery_mode,
            "declare": self.declare,
            "headers": self.headers,
            **self.properties,
        }


_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_EMBED_JSON = json.dumps(_EMBED)


class MessageBuilder:
    """Builds the messages of a batch for ``app``.

    A batch is built against one configuration, and a later batch sees any change to it
    (Django settings, ``app.conf`` changes, a new router or queues, a fork, a task running
    in the thread): create a builder per batch, or :meth:`refresh` one kept from an earlier
    batch. What the configuration says, and each handler's route, is kept per app until it
    changes.
    """

    __slots__ = ("app", "last", "lean", "origin", "reply_to", "routes", "stamp")

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.stamp: tuple[Any, ...] = ()
        self.refresh()

    def refresh(self) -> None:
        """Read the configuration again, as a new builder would: before each batch."""
        app = self.app
        amqp = routing.cached(app, "amqp")
        router: Any = routing.cached(amqp, "router")
        routes = router.routes
        queues = routing.cached(amqp, "queues")
        # Celery routes with the routes its router was built with, whatever app.conf says
        # since (reading app.conf.task_routes costs ~15 us when it is Django's settings): a
        # project that changes them rebuilds the router, and a new router recomputes.
        stamp = self.stamp
        if not stamp or stamp[1] is not router or stamp[2] is not routes or stamp[3] is not queues:
            stamp = self.stamp = (app, router, routes, queues)
        state = routing.app_state(app, stamp)
        # A call made while a worker runs a task takes Celery's path (root and parent ids).
        self.lean = state.lean and routing.worker_task() is None
        self.origin = state.origin
        self.reply_to = app.thread_oid
        self.routes = state.routes
        #: The last route: (task, options, route).
        self.last: tuple[Any, Any, routing.Route] | None = None

    def build(
        self,
        task: Any,
        call_id: str,
        body: dict[str, Any],
        options: Mapping[str, Any],
        body_text: str | None = None,
        kwargsrepr: str | None = None,
    ) -> Message | None:
        """The message ``task.apply_async(kwargs=body, task_id=call_id, **options)`` sends.

        ``options`` are the handler's publish options (``conf.PUBLISH_OPTIONS``);
        ``body_text``, if known, ``body`` as kombu's JSON encoder writes it; ``kwargsrepr``,
        if known, ``summary(body)``. Returns ``None``
        when the call must take the per-call path (``producer.publish_fallback``).
        """
        if not self.lean:
            return None
        route = self._route(task, options)
        template = route.template
        if template is None:
            return None
        eta = expires = None
        if route.countdown or route.expires is not None:
            now = self.app.now()
            timezone = self.app.timezone
            if route.countdown:
                eta = maybe_make_aware(_add(now, route.countdown), tz=timezone).isoformat()
            if route.expires is not None:
                expires = maybe_make_aware(_add(now, route.expires), tz=timezone).isoformat()
        if kwargsrepr is None:
            kwargsrepr = summary(body)
        # Key for key the headers of Celery's as_task_v2, in its order.
        headers: dict[str, Any] = {
            "lang": "py",
            "task": template.task,
            "id": call_id,
            "shadow": None,
            "eta": eta,
            "expires": expires,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": list(route.time_limits),
            "root_id": call_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": kwargsrepr,
            "origin": self.origin,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        # Not the copies of argsrepr/kwargsrepr that apply_async(kwargsrepr=...) leaves among
        # the properties (kombu's publish takes every unnamed option for a property): no
        # consumer reads them there, AMQP drops them on the wire, and on Redis they were a
        # sixth of each message, paid for on every hop (see PROPERTIES_LEFT_OUT).
        properties = {"correlation_id": call_id, "reply_to": self.reply_to}
        properties.update(template.properties)
        return Message(
            task=template.task,
            body=((), body, dict(_EMBED)),
            headers=headers,
            properties=properties,
            exchange=template.exchange,
            routing_key=template.routing_key,
            declare=template.declare,
            delivery_mode=template.delivery_mode,
            serializer=template.serializer,
            compression=template.compression,
            retry_policy=dict(template.retry_policy),
            body_json=None if body_text is None else f"[[], {body_text}, {_EMBED_JSON}]",
            layout=(route, headers, properties),
        )

    def _route(self, task: Any, options: Mapping[str, Any]) -> routing.Route:
        # Handler tasks are shared_task proxies, and each attribute read resolves the proxy:
        # look a route up by the identity of the task object, for as long as the app's
        # configuration holds (a Django setting change clears it all).
        # The task's own options are read once by Celery and kept on the task: a task
        # registered again under the name (a shared_task proxy then resolves to it) has new
        # ones, and gets a new route.
        # A batch often holds many calls of one handler in a row: the same objects give
        # the same route for as long as this builder lives.
        last = self.last
        if last is not None and last[0] is task and last[1] is options:
            return last[2]
        items = tuple(options.items())
        exec_options = task._get_exec_options()
        seen = self.routes.get((id(task), items))
        if seen is not None and seen[0] is task and seen[1].stamp[-1] is exec_options:
            self.last = (task, options, seen[1])
            return seen[1]
        route = routing.route(self.app, task, items, options, (*self.stamp, exec_options))
        self.routes[(id(task), items)] = (task, route)
        self.last = (task, options, route)
        return route


def summary(body: dict[str, Any], limit: int = 400) -> str:
    """A short line for a message: Celery's ``kwargsrepr`` (Flower, worker logs) and our logs.

    It holds no argument values, which may be personal data: an instance shows its model and
    pk, a model class its label, ``None`` and booleans themselves, anything else its type.
    """
    parts = [f"sender={_redacted(body['sender'])}"]
    parts += [f"{name}={_redacted(value)}" for name, value in body["kwargs"].items()]
    text = ", ".join(parts)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _redacted(data: JSON) -> str:
    if data is None or type(data) is bool:
        return repr(data)
    if type(data) is dict:
        tag = data.get(TAG)
        if tag == "model":
            pk = data["pk"]
            return f"<{data['m']} pk={pk['v'] if type(pk) is dict else pk}>"
        if tag == "modelclass":
            return str(data["v"])
        return f"<{tag or 'dict'}>"
    return f"<{type(data).__name__}>"
