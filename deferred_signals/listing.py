"""``manage.py deferred_signals list``: every deferred handler, what it listens to, how it runs."""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery
from celery._state import get_current_app
from django.core.management.base import OutputWrapper
from django.core.management.color import Style
from django.dispatch import Signal
from django.dispatch.dispatcher import _make_id  # type: ignore[attr-defined]

from . import registry
from .conf import BUILTIN_DEFAULTS, conf

#: Options the text listing shows; unset worker options show the Celery value in effect.
SHOWN_OPTIONS = ("queue", "max_retries", "autoretry_for", "retry_backoff", "acks_late", "instance")
TASK_ATTRIBUTES = ("max_retries", "acks_late")
#: The other options are listed only where they differ from these.
LISTED_DEFAULTS: dict[str, Any] = {
    **{
        key: list(value) if key.endswith("_for") else value
        for key, value in BUILTIN_DEFAULTS.items()
    },
    "delivery": "on_commit",
}


def handlers_report(workers: bool = True, timeout: float = 1.0) -> list[dict[str, Any]]:
    """One JSON-ready entry per registered handler, sorted by name.

    ``queue`` is where the handler's messages go, resolved by the Celery app's router as a
    publish would; with ``workers``, ``workers`` lists the live workers consuming that queue
    (asked with ``inspect active_queues``), or is "unknown" when no worker answered, and
    ``unregistered_on`` those of them that have not imported the handler (``inspect
    registered``): Celery discards its messages there, as unregistered tasks.
    """
    names = _signal_names()
    app = get_current_app()
    consumers, known = _consumers(app, timeout) if workers else (None, {})
    handlers: list[dict[str, Any]] = []
    for handler in sorted(registry.all_handlers(), key=lambda h: h.name):
        merged = handler.merged
        queue = _queue(app, handler)
        consuming = (
            consumers
            if consumers is None
            else "unknown"
            if isinstance(consumers, str)
            # sorted(): a stable listing, whatever order the replies came in
            else sorted(consumers.get(queue, ()))
        )
        handlers.append(
            {
                "name": handler.name,
                "function": f"{handler.func.__module__}.{handler.func.__qualname__}",
                "connections": [
                    {"signal": names.get(id(signal), repr(signal)), "sender": _label(sender)}
                    for signal, sender, uid in handler.connections
                    if _connected(signal, sender, uid)
                ],
                "queue": queue,
                "workers": consuming,
                # Why "unknown": a broker that is down is not workers that are.
                "workers_unknown_reason": consumers if isinstance(consumers, str) else None,
                "unregistered_on": [
                    worker
                    for worker in (consuming if isinstance(consuming, list) else ())
                    # A worker that did not answer ``registered`` is not accused.
                    if worker in known and handler.name not in known[worker]
                ],
                "aliases": list(handler.aliases),
                "options": {
                    "queue": queue,
                    **{key: getattr(handler.task, key) for key in TASK_ATTRIBUTES},
                    **{
                        key: _label(value) if key.endswith("_for") else value
                        for key, value in merged.values.items()
                    },
                },
                "include_raw": handler.include_raw,
                "using": handler.using,
            }
        )
    return handlers


def print_handlers(handlers: list[dict[str, Any]], out: OutputWrapper, style: Style) -> None:
    if not handlers:
        out.write("No deferred handlers are registered.")
    for entry in handlers:
        out.write(style.SUCCESS(entry["name"]))
        for connection in entry["connections"]:
            out.write(f"  {connection['signal']} from {connection['sender']}")
        shown = {k: entry["options"].get(k) for k in SHOWN_OPTIONS}
        # And whatever else a layer changed (coalesce, delivery, rate_limit...), or a user
        # who set it has no way to see, short of --json, that it took.
        shown.update(
            (key, value)
            for key, value in entry["options"].items()
            if key not in shown and value != LISTED_DEFAULTS.get(key)
        )
        out.write("  " + ", ".join(f"{k}={v}" for k, v in shown.items()))
        workers = entry["workers"]
        if isinstance(workers, str):
            out.write(f"  consumed by: {workers} ({entry['workers_unknown_reason']})")
        elif workers:
            out.write(f"  consumed by: {', '.join(workers)}")
            if entry["unregistered_on"]:
                kept = (
                    "it keeps them as dead letters, to replay once it runs them"
                    if conf.dead_letters
                    else "with DEAD_LETTERS off, they are lost"
                )
                out.write(
                    style.ERROR(
                        f"  not imported by: {', '.join(entry['unregistered_on'])}: such a "
                        f"worker does not run this handler's calls: {kept}. Restart a worker "
                        "started before the handler was added; otherwise import the handler's "
                        "module from an AppConfig.ready(), which every process runs at "
                        "start-up, not on first use (inside a view, a command...)."
                    )
                )
        elif workers is not None:
            out.write(f"  consumed by: no live worker (start one with -Q {entry['queue']})")
        if entry["aliases"]:
            out.write(f"  also answers to its former names: {', '.join(entry['aliases'])}")


def _queue(app: Celery, handler: registry.Handler) -> str:
    """The queue a publish of ``handler`` goes to: its queue option, task_routes, the default."""
    queue = handler.merged.publish.get("queue")
    try:
        route = app.amqp.router.route(
            {"queue": queue} if queue else {}, handler.name, task_type=handler.task
        )
    except Exception as error:  # e.g. QueueNotFound, or a router function that failed
        return f"unresolved ({type(error).__name__}: {error})"
    found = route.get("queue")
    if found is None:  # a route to an exchange: the broker's bindings decide
        return f"exchange {route.get('exchange')!r}, routing key {route.get('routing_key')!r}"
    return str(getattr(found, "name", found))


def _consumers(
    app: Celery, timeout: float
) -> tuple[dict[str, list[str]] | str, dict[str, set[str]]]:
    """Queue name -> the live workers consuming it (or why nobody could tell), and
    worker -> the task names it has registered (for the workers that said)."""
    try:
        with app.connection_for_write() as connection:
            # Fail at once on a broker that is down instead of retrying for seconds.
            connection.ensure_connection(max_retries=1)
            replies = app.control.inspect(timeout=timeout, connection=connection).active_queues()
            registered = (
                # Only the workers that answered, and done as soon as they all have. Asked
                # for an attribute no task has, a worker lists bare names.
                app.control.inspect(
                    list(replies), timeout=timeout, connection=connection, limit=len(replies)
                ).registered(NAMES_ONLY)
                if replies
                else None
            )
    except Exception as error:  # the broker is unreachable: not this listing's to solve
        return f"the broker did not answer: {type(error).__name__}: {error}", {}
    if not replies:
        return "no worker answered", {}
    consumers: dict[str, list[str]] = {}
    for worker, queues in replies.items():
        for queue in queues or ():
            consumers.setdefault(queue.get("name"), []).append(worker)
    known = {
        worker: registered_names(tasks)
        for worker, tasks in (registered or {}).items()
        if isinstance(tasks, list)  # not an error reply ({"error": ...}): nothing said
    }
    return consumers, known


#: The task attribute ``list`` asks ``inspect registered`` for: none has it, so each task is
#: listed by its bare name, without " [rate_limit=...]".
NAMES_ONLY = "deferred_signals_name_only"


def registered_names(tasks: list[Any]) -> set[str]:
    """The task names of a worker's ``registered`` reply. A name may hold spaces (a handler's
    ``name=`` is any str): an entry is cut only at a trailing " [attr=value ...]"."""
    names: set[str] = set()
    for task in tasks:
        entry = str(task)
        names.add(entry)
        if entry.endswith("]") and " [" in entry:
            names.add(entry[: entry.rindex(" [")])
    return names


def _connected(signal: Signal, sender: Any, uid: Any) -> bool:
    """Still connected: ``signal.disconnect(handler)`` bypasses the registry."""
    if isinstance(sender, str):  # a lazy "app_label.Model" sender: resolved by Django later
        return True
    return any(key == (uid, _make_id(sender)) for key, *_ in signal.receivers)


def _label(value: Any) -> Any:
    if value is None:
        return "any sender"
    if isinstance(value, type):
        meta = getattr(value, "_meta", None)
        return meta.label if meta is not None else f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (list, tuple)):
        return [_label(item) for item in value]
    return value if isinstance(value, str) else repr(value)


def _signal_names() -> dict[int, str]:
    """``id(signal) -> "module.name"`` for the signals imported so far (a CLI can afford it)."""
    names: dict[int, str] = {}
    for module_name, module in list(sys.modules.items()):
        for attribute, value in list(getattr(module, "__dict__", {}).items()):
            # type(), not isinstance(): the latter would evaluate lazy objects (settings...).
            if issubclass(type(value), Signal) and id(value) not in names:
                names[id(value)] = f"{module_name}.{attribute}"
    return names
