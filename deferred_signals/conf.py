"""``settings.DEFERRED_SIGNALS`` read: the merged options per handler, and the top-level ones.

Settings are read lazily, through :data:`conf`, and every cached value is dropped on Django's
``setting_changed`` signal, so ``override_settings`` works in tests. What each option takes,
and the problems of a value, are :mod:`schema`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver as django_receiver

from .exceptions import DeferredSignalConfigError
from .schema import (
    SETTING,
    TOP_LEVEL_DEFAULTS,
    import_exception,
    limits_problem,
    settings_problems,
)

#: Options copied into each message's publish options when set.
PUBLISH_OPTIONS = ("queue", "priority", "countdown", "expires", "time_limit", "soft_time_limit")
#: Task attributes the worker reads; unset ones fall back to the Celery app's own setting.
WORKER_OPTIONS = {
    "acks_late": "task_acks_late",
    "reject_on_worker_lost": "task_reject_on_worker_lost",
    "rate_limit": "task_default_rate_limit",
    "time_limit": "task_time_limit",
    "soft_time_limit": "task_soft_time_limit",
}
#: What a handler gets when no layer sets the option (beyond Celery's own task defaults).
BUILTIN_DEFAULTS: dict[str, Any] = {
    # At-least-once on the worker: a child killed mid-handler (OOM, deploy) runs it again.
    "acks_late": True,
    "reject_on_worker_lost": True,
    "idempotent": False,
    "db_retry_window": 900,
    "instance": "fresh",
    "on_missing": "skip",
    "retry_backoff": False,
    "retry_backoff_max": 600,
    "retry_jitter": True,
    "autoretry_for": (),
    "dont_autoretry_for": (),
    "coalesce": False,
}


@dataclass(frozen=True)
class HandlerOptions:
    """The merged options of one handler: HANDLERS > decorator > DEFAULTS > built-in."""

    values: Mapping[str, Any]
    autoretry_for: tuple[type[BaseException], ...]
    dont_autoretry_for: tuple[type[BaseException], ...]
    publish: Mapping[str, Any]
    #: Read on every call in the request: resolved once here.
    fresh: bool = True
    snapshot_fallback: bool = False
    outbox: bool = False
    coalesce: bool = False
    #: Options valid one by one that cannot go together once merged: raised at each send.
    conflict: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def _exceptions(items: Iterable[str | type[BaseException]]) -> tuple[type[BaseException], ...]:
    return tuple(import_exception(item) if isinstance(item, str) else item for item in items)


class Settings:
    """Lazy, cached view of ``settings.DEFERRED_SIGNALS``."""

    def __init__(self) -> None:
        self._options: dict[str, HandlerOptions] = {}
        #: Grows with every change that may change a handler's options, ours or Celery's
        #: (any setting, a handler registered again): what is cached per handler elsewhere
        #: (the tasks' attributes) is kept only while it stays the same.
        self.generation = 0

    def reset(self) -> None:
        self._options.clear()
        self.__dict__.pop("raw", None)
        self.generation += 1

    def forget(self, name: str) -> None:
        """Drop one handler's merged options (it was registered again, or removed)."""
        self._options.pop(name, None)
        self.generation += 1

    @cached_property
    def raw(self) -> Mapping[str, Any]:
        raw = getattr(settings, SETTING, {})
        problems = settings_problems(raw)
        if problems:
            first = problems[0]
            raise DeferredSignalConfigError(f"{first.msg} {first.hint} ({first.id})")
        return raw

    def _get(self, key: str) -> Any:
        return self.raw.get(key, TOP_LEVEL_DEFAULTS[key])

    @property
    def eager(self) -> bool:
        return bool(self._get("EAGER"))

    @property
    def eager_propagates(self) -> bool:
        """With ``EAGER``, a handler's exception propagates out of the commit (tests)."""
        return bool(self._get("EAGER_PROPAGATES"))

    @property
    def publish_timeout(self) -> float:
        """Seconds a commit may spend publishing, a hung broker included."""
        return float(self._get("PUBLISH_TIMEOUT"))

    @property
    def publish_cooldown(self) -> float:
        """Seconds a process spills without trying the broker after a failed publish."""
        return float(self._get("PUBLISH_COOLDOWN"))

    @property
    def outbox_grace(self) -> float:
        """Seconds the relay leaves an outbox row alone: the request publishes it first."""
        return float(self._get("OUTBOX_GRACE"))

    @property
    def relay_max_attempts(self) -> int:
        return int(self._get("RELAY_MAX_ATTEMPTS"))

    @property
    def dead_letters(self) -> bool:
        """Record calls that failed for good as ``DeadLetter`` rows (default True)."""
        return bool(self.raw.get("DEAD_LETTERS", True))

    @property
    def handler_settings(self) -> Mapping[str, Mapping[str, Any]]:
        return self.raw.get("HANDLERS", {})  # type: ignore[no-any-return]

    def options(self, name: str, decorator_options: Mapping[str, Any]) -> HandlerOptions:
        """Merged options for handler ``name``; cached until the settings change."""
        try:
            return self._options[name]
        except KeyError:
            pass
        values = {
            **BUILTIN_DEFAULTS,
            "delivery": self._get("DELIVERY"),
            **self.raw.get("DEFAULTS", {}),
            **decorator_options,
            **self.handler_settings.get(name, {}),
        }
        merged = HandlerOptions(
            values=values,
            autoretry_for=_exceptions(values["autoretry_for"]),
            dont_autoretry_for=_exceptions(values["dont_autoretry_for"]),
            publish={k: values[k] for k in PUBLISH_OPTIONS if values.get(k) is not None},
            fresh=values.get("instance") == "fresh",
            snapshot_fallback=values.get("on_missing") == "snapshot",
            outbox=values.get("delivery") == "outbox",
            coalesce=bool(values.get("coalesce")),
            conflict=_conflict(name, values),
        )
        self._options[name] = merged
        return merged


def _conflict(name: str, values: Mapping[str, Any]) -> str | None:
    problem = limits_problem(values, f"Deferred handler {name!r}", "deferred_signals.E011")
    return None if problem is None else f"{problem.msg} {problem.hint} ({problem.id})"


conf = Settings()


@django_receiver(setting_changed)
def _reset_on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING:
        conf.reset()
    else:  # e.g. a CELERY_* setting, which the tasks' attributes may fall back to
        conf.generation += 1
