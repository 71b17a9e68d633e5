"""Where a handler's messages go, resolved once: what ``apply_async`` resolves on every call.

``apply_async`` → ``send_task`` → ``send_task_message`` merge the task's options, route
through ``task_routes``, resolve the queue, its exchange and delivery mode on every call.
For one handler and one set of publish options all of that is constant while the app's
configuration holds: :func:`route` resolves it once into a :class:`Route` (the constant
part of each message, a :class:`Template`), and :func:`app_state` reads once what the app's
configuration says. Both are kept until it changes: a new router, routes or queues, a change
on ``app.conf``, a Django setting change (:func:`clear_cache`), a fork.

A route whose template is ``None`` sends its calls down the per-call path
(``apply_async`` itself): see :mod:`messages` for when.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import celery._state
from celery import Celery
from celery._state import get_current_worker_task
from celery.app.routes import MapRoute
from celery.utils.nodenames import anon_nodename
from celery.utils.quorum_queues import detect_quorum_queues
from django.core.signals import setting_changed
from kombu import Queue
from kombu.common import Broadcast

#: What get_current_worker_task() walks; private, hence None if a Celery moved it.
_task_stack: Any = getattr(celery._state, "_task_stack", None)
#: Its threads' stacks by thread (celery.utils.threads.Local): empty while no thread of the
#: process runs a task, as a web process never does. None if a Celery keeps them otherwise.
_task_stacks: Any = getattr(getattr(_task_stack, "_local", None), "__storage__", None)
if type(_task_stacks) is not dict:
    _task_stacks = None

#: ``Task.apply_async``/``send_task_message`` arguments that are not message properties.
_ROUTING_KEYS = frozenset((
    "exchange", "routing_key", "queue", "event_dispatcher", "retry", "retry_policy",
    "serializer", "delivery_mode", "compression", "declare", "headers", "exchange_type",
    "timeout", "confirm_timeout",
))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Template:
    """What every message of one route carries, as ``send_task_message`` resolves it."""

    task: str
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


@dataclass(frozen=True, slots=True)
class Route:
    """What is constant in every message of one handler with one set of publish options."""

    #: The state it was computed from: any change (identity) recomputes it.
    stamp: tuple[Any, ...]
    #: None when the handler must take the per-call path.
    template: Template | None
    time_limits: tuple[Any, Any]
    countdown: float | None
    expires: float | None


_routes: dict[tuple[Any, ...], Route] = {}
#: Celery settings that send a call down the per-call path.
_PER_CALL_SETTINGS = ("task_always_eager", "task_send_sent_event")
#: Where each of them is in ``AppState.seen``.
_PER_CALL_SEEN = tuple(enumerate(_PER_CALL_SETTINGS, start=5))


@dataclass(slots=True)
class AppState:
    """What one app's configuration says, and the routes checked against it."""

    #: What it was read from: the router, its routes, the queues, app.conf changes.
    seen: tuple[Any, ...]
    lean: bool
    origin: str
    #: Routes by (task object id, options): kept with the task, so a reused id cannot
    #: return another task's route.
    routes: dict[tuple[int, tuple[Any, ...]], tuple[Any, Route]]


_app_state: dict[int, AppState] = {}


def clear_cache() -> None:
    """Forget every resolved route and app configuration (settings changed)."""
    _routes.clear()
    _app_state.clear()


def cached(obj: Any, name: str) -> Any:
    """``obj.name`` for one of Celery's cached properties, without their lock once computed."""
    value = obj.__dict__.get(name)
    return getattr(obj, name) if value is None else value


#: This process's pid, one int object until a fork (the caches compare by identity).
_pids = [os.getpid()]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _pids.__setitem__(0, os.getpid()))


def worker_task() -> Any:
    """Celery's ``get_current_worker_task()``, after a cheap look at its stack (empty outside
    a worker's task, that is on every request)."""
    if _task_stacks is not None and not _task_stacks:
        return None  # no thread runs a task (~1 us less than asking the stack)
    if _task_stack is not None and _task_stack.top is None:
        return None
    return get_current_worker_task()


def app_state(app: Celery, stamp: tuple[Any, ...]) -> AppState:
    """What ``app``'s configuration says, read again only when it changed.

    ``stamp`` is ``(app, router, routes, queues)`` as the caller read them. What app.conf
    says costs ~40 us through Django's settings: read once per app, again after a settings
    change or a change made on app.conf itself (kept in its changes), and in a forked child
    (its origin, "gen<pid>@host", is its own).
    """
    changes = app.conf.changes or {}
    pid = _pids[0]
    state = _app_state.get(id(app))
    if (
        state is None
        or (seen := state.seen)[0] is not app
        or seen[1] is not stamp[1]
        or seen[2] is not stamp[2]
        or seen[3] is not stamp[3]
        or seen[4] is not pid
        or any(seen[i] is not changes.get(key) for i, key in _PER_CALL_SEEN)
    ):
        seen = (*stamp, pid, *(changes.get(key) for key in _PER_CALL_SETTINGS))
        conf = app.conf
        lean = not (
            conf.task_always_eager
            or conf.task_send_sent_event
            or any(not isinstance(route, MapRoute) for route in stamp[2])
        )
        state = _app_state[id(app)] = AppState(seen, lean, anon_nodename(), {})
    return state


def route(
    app: Celery,
    task: Any,
    items: tuple[Any, ...],
    options: Mapping[str, Any],
    stamp: tuple[Any, ...],
) -> Route:
    """``task``'s route with ``options`` (``items`` is ``tuple(options.items())``), resolved
    again only when ``stamp`` (the app's routing and the task's own options) changed."""
    key = (app, task.name, items)
    found = _routes.get(key)
    if found is None or not all(a is b for a, b in zip(found.stamp, stamp, strict=True)):
        found = _routes[key] = _resolve(app, task, options, stamp)
    return found


def _resolve(app: Celery, task: Any, options: Mapping[str, Any], stamp: tuple[Any, ...]) -> Route:
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
    fallback = Route(stamp, None, time_limits, countdown, expires)
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
    if routed.get("headers"):
        return fallback  # headers given in options: rare enough to leave to Celery
    template = Template(
        task=task.name,
        properties={k: v for k, v in routed.items() if k not in _ROUTING_KEYS},
        exchange=exchange,
        routing_key=routing_key,
        declare=declare,
        delivery_mode=delivery_mode,
        serializer=routed.get("serializer") or app.conf.task_serializer,
        compression=routed.get("compression") or app.conf.task_compression,
        retry_policy=dict(app.conf.task_publish_retry_policy),
    )
    return Route(stamp, template, time_limits, countdown, expires)


def _reset(**kwargs: Any) -> None:
    # A setting of Celery's (CELERY_*) or ours may change the routing: recompute everything.
    clear_cache()


setting_changed.connect(_reset, dispatch_uid="deferred_signals.messages")
