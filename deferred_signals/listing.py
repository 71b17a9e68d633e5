"""``manage.py deferred_signals list``: every deferred handler, what it listens to, how it runs."""

from __future__ import annotations

import sys
from typing import Any

from celery import current_app
from django.core.management.base import OutputWrapper
from django.core.management.color import Style
from django.dispatch import Signal
from django.dispatch.dispatcher import _make_id  # type: ignore[attr-defined]

from . import registry

#: Options the text listing shows; unset worker options show the Celery value in effect.
SHOWN_OPTIONS = ("queue", "max_retries", "autoretry_for", "retry_backoff", "acks_late", "instance")
TASK_ATTRIBUTES = ("max_retries", "acks_late")


def handlers_report() -> list[dict[str, Any]]:
    """One JSON-ready entry per registered handler, sorted by name."""
    names = _signal_names()
    handlers: list[dict[str, Any]] = []
    for handler in sorted(registry.all_handlers(), key=lambda h: h.name):
        merged = handler.merged
        handlers.append(
            {
                "name": handler.name,
                "function": f"{handler.func.__module__}.{handler.func.__qualname__}",
                "connections": [
                    {"signal": names.get(id(signal), repr(signal)), "sender": _label(sender)}
                    for signal, sender, uid in handler.connections
                    if _connected(signal, sender, uid)
                ],
                "options": {
                    "queue": f"{current_app.conf.task_default_queue} (or task_routes)",
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
        out.write("  " + ", ".join(f"{k}={v}" for k, v in shown.items()))


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
