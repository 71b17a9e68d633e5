"""Celery task messages built without ``Task.apply_async``, and their publishing.

``apply_async`` redoes per message what is constant per handler: merging the task's
options, routing through ``task_routes``, resolving the queue, its exchange and delivery
mode, and declaring the queue. A :class:`MessageBuilder` resolves all that once per
handler and its publish options, then builds each message as a copy of a template: the
same protocol-v2 headers, properties and body ``apply_async`` produces, so any Celery
worker, Flower and ``celery inspect`` read it.
:func:`deferred_signals.publisher.publish_message` hands it to a producer.

What the builder cannot resolve once, it refuses (``build`` returns ``None``) and the call
takes the per-call path, :func:`deferred_signals.publisher.publish_fallback`, which is
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
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import celery
import celery._state
from celery import Celery
from celery._state import get_current_worker_task
from celery.app.routes import MapRoute
from celery.utils import time as celery_time
from celery.utils.nodenames import anon_nodename
from celery.utils.quorum_queues import detect_quorum_queues
from celery.utils.time import maybe_make_aware
from django.core.signals import setting_changed
from kombu import Queue
from kombu.common import Broadcast

from .codec import summary

#: What get_current_worker_task() walks; private, hence None if a Celery moved it.
_task_stack: Any = getattr(celery._state, "_task_stack", None)
#: Its threads' stacks by thread (celery.utils.threads.Local): empty while no thread of the
#: process runs a task, as a web process never does. None if a Celery keeps them otherwise.
_task_stacks: Any = getattr(getattr(_task_stack, "_local", None), "__storage__", None)
if type(_task_stacks) is not dict:
    _task_stacks = None


def _add_seconds(dt: datetime, seconds: float) -> datetime:
    return dt + timedelta(seconds=seconds)


# Celery >= 5.6 adds in UTC, across daylight saving changes; the builder adds as Celery does.
_add: Callable[[datetime, float], datetime] = getattr(
    celery_time, "add_seconds_to_datetime", _add_seconds
)

__all__ = ["Message", "MessageBuilder"]

#: ``Task.apply_async``/``send_task_message`` arguments that are not message properties.
_ROUTING_KEYS = frozenset((
    "exchange", "routing_key", "queue", "event_dispatcher", "retry", "retry_policy",
    "serializer", "delivery_mode", "compression", "declare", "headers", "exchange_type",
    "timeout", "confirm_timeout",
))  # fmt: skip

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


@dataclass(frozen=True, slots=True)
class _Route:
    """What is constant in every message of one handler with one set of publish options."""

    #: The state it was computed from: any change (identity) recomputes it.
    stamp: tuple[Any, ...]
    #: None when the handler must take the per-call path.
    template: Message | None
    time_limits: tuple[Any, Any]
    countdown: float | None
    expires: float | None


_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_EMBED_JSON = json.dumps(_EMBED)

_routes: dict[tuple[Any, ...], _Route] = {}
#: Celery settings that send a call down the per-call path.
_PER_CALL_SETTINGS = ("task_always_eager", "task_send_sent_event")
#: Where each of them is in ``_AppState.seen``.
_PER_CALL_SEEN = tuple(enumerate(_PER_CALL_SETTINGS, start=5))


@dataclass(slots=True)
class _AppState:
    """What one app's configuration says, and the routes checked against it."""

    #: What it was read from: the router, its routes, the queues, app.conf changes.
    seen: tuple[Any, ...]
    lean: bool
    origin: str
    #: Routes by (task object id, options): kept with the task, so a reused id cannot
    #: return another task's route.
    routes: dict[tuple[int, tuple[Any, ...]], tuple[Any, _Route]]


_app_state: dict[int, _AppState] = {}


def clear_cache() -> None:
    """Forget every resolved route and app configuration (settings changed)."""
    _routes.clear()
    _app_state.clear()


def _cached(obj: Any, name: str) -> Any:
    """``obj.name`` for one of Celery's cached properties, without their lock once computed."""
    value = obj.__dict__.get(name)
    return getattr(obj, name) if value is None else value


#: This process's pid, one int object until a fork (the caches compare by identity).
_pids = [os.getpid()]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _pids.__setitem__(0, os.getpid()))


def _pid() -> int:
    return _pids[0]


def _worker_task() -> Any:
    """Celery's ``get_current_worker_task()``, after a cheap look at its stack (empty outside
    a worker's task, that is on every request)."""
    if _task_stacks is not None and not _task_stacks:
        return None  # no thread runs a task (~1 us less than asking the stack)
    if _task_stack is not None and _task_stack.top is None:
        return None
    return get_current_worker_task()


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
        amqp = _cached(app, "amqp")
        router: Any = _cached(amqp, "router")
        routes = router.routes
        queues = _cached(amqp, "queues")
        # Celery routes with the routes its router was built with, whatever app.conf says
        # since (reading app.conf.task_routes costs ~15 us when it is Django's settings): a
        # project that changes them rebuilds the router, and a new router recomputes.
        stamp = self.stamp
        if not stamp or stamp[1] is not router or stamp[2] is not routes or stamp[3] is not queues:
            stamp = self.stamp = (app, router, routes, queues)
        # What app.conf says is read once per app (~40 us through Django's settings): again
        # after a settings change, or a change made on app.conf itself (kept in its changes).
        changes = app.conf.changes or {}
        # The pid too: a forked child's origin ("gen<pid>@host") is its own.
        pid = _pid()
        state = _app_state.get(id(app))
        if (
            state is None
            or (seen := state.seen)[0] is not app
            or seen[1] is not router
            or seen[2] is not routes
            or seen[3] is not queues
            or seen[4] is not pid
            or any(seen[i] is not changes.get(key) for i, key in _PER_CALL_SEEN)
        ):
            seen = (*stamp, pid, *(changes.get(key) for key in _PER_CALL_SETTINGS))
            conf = app.conf
            lean = not (
                conf.task_always_eager
                or conf.task_send_sent_event
                or any(not isinstance(route, MapRoute) for route in routes)
            )
            state = _app_state[id(app)] = _AppState(seen, lean, anon_nodename(), {})
        # A call made while a worker runs a task takes Celery's path (root and parent ids).
        self.lean = state.lean and _worker_task() is None
        self.origin = state.origin
        self.reply_to = app.thread_oid
        self.routes = state.routes
        #: The last route: (task, options, route).
        self.last: tuple[Any, Any, _Route] | None = None

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
        if known, ``codec.summary(body)``. Returns ``None``
        when the call must take the per-call path (``publisher.publish_fallback``).
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

    def _route(self, task: Any, options: Mapping[str, Any]) -> _Route:
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
        key = (self.app, task.name, items)
        stamp = (*self.stamp, exec_options)
        route = _routes.get(key)
        if route is None or not _same(route.stamp, stamp):
            route = _routes[key] = _resolve(self.app, task, options, stamp)
        self.routes[(id(task), items)] = (task, route)
        self.last = (task, options, route)
        return route


def _same(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    return all(a is b for a, b in zip(old, new, strict=True))


def _resolve(app: Celery, task: Any, options: Mapping[str, Any], stamp: tuple[Any, ...]) -> _Route:
    """Run once what ``apply_async`` → ``send_task`` → ``send_task_message`` run per call."""
    # apply_async
    if task.soft_time_limit and task.time_limit and task.soft_time_limit > task.time_limit:
        raise ValueError("soft_time_limit must be less than or equal to time_limit")
    merged = dict(task._get_exec_options(), **options)
    merged.setdefault("ignore_result", task.ignore_result)
    countdown = merged.pop("countdown", None)
    # send_task
    time_limits = (merged.pop("time_limit", None), merged.pop("soft_time_limit", None))
    expires = merged.pop("expires", None)
    ignore_result = merged.pop("ignore_result", None)
    router: Any = app.amqp.router
    routed = router.route(merged, task.name, None, {}, task)
    fallback = _Route(stamp, None, time_limits, countdown, expires)
    if not ignore_result:
        return fallback  # the result backend wants to know of each call (on_task_call)
    if countdown:
        driver_type = app.producer_pool.connections.connection.transport.driver_type
        if detect_quorum_queues(app, driver_type)[0]:
            return fallback
    if expires is not None:
        routed["expiration"] = max(expires, 0)
    # send_task_message
    queue = routed.get("queue")
    exchange = routed.get("exchange")
    routing_key = routed.get("routing_key")
    delivery_mode = routed.get("delivery_mode")
    exchange_type = routed.get("exchange_type")
    qname = queue
    if queue is None and exchange is None:
        queue = app.amqp.default_queue
    if queue is not None:
        if isinstance(queue, str):
            qname, queue = queue, app.amqp.queues[queue]
        else:
            qname = queue.name
    if delivery_mode is None:
        delivery_mode = getattr(getattr(queue, "exchange", None), "delivery_mode", None)
        delivery_mode = delivery_mode or app.conf.task_default_delivery_mode
    if exchange_type is None:
        exchange_type = getattr(getattr(queue, "exchange", None), "type", "direct")
    if (not exchange or not routing_key) and exchange_type == "direct":
        exchange, routing_key = "", qname
    elif exchange is None:
        assert queue is not None  # a non-direct exchange comes from a queue
        exchange = queue.exchange.name or app.amqp.default_exchange
        routing_key = routing_key or queue.routing_key or app.conf.task_default_routing_key
    declare = routed.get("declare")
    if declare is None and queue and not isinstance(queue, Broadcast):
        declare = [queue]
    template = Message(
        task=task.name,
        body=((), {}, {}),
        headers=dict(routed.get("headers") or {}),
        properties={k: v for k, v in routed.items() if k not in _ROUTING_KEYS},
        exchange=exchange,
        routing_key=routing_key,
        declare=declare,
        delivery_mode=delivery_mode,
        serializer=routed.get("serializer") or app.conf.task_serializer,
        compression=routed.get("compression") or app.conf.task_compression,
        retry_policy=dict(app.conf.task_publish_retry_policy),
    )
    if template.headers:
        return fallback  # headers given in options: rare enough to leave to Celery
    return _Route(stamp, template, time_limits, countdown, expires)


def _reset(**kwargs: Any) -> None:
    # A setting of Celery's (CELERY_*) or ours may change the routing: recompute everything.
    clear_cache()


setting_changed.connect(_reset, dispatch_uid="deferred_signals.messages")
