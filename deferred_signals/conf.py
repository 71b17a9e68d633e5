"""``settings.DEFERRED_SIGNALS``: the schema, its validation and the merged options per handler.

Settings are read lazily, through :data:`conf`, and every cached value is dropped on Django's
``setting_changed`` signal, so ``override_settings`` works in tests.
"""

from __future__ import annotations

import builtins
import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from celery.utils.time import rate
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver as django_receiver
from django.utils.module_loading import import_string

from .exceptions import DeferredSignalConfigError

SETTING = "DEFERRED_SIGNALS"
#: Top-level keys with a default, and what each must be (checked as the options are).
TOP_LEVEL_DEFAULTS: dict[str, Any] = {
    "EAGER": False,
    "EAGER_PROPAGATES": False,
    "DEAD_LETTERS": True,
    "DELIVERY": "on_commit",
    "PUBLISH_TIMEOUT": 2.0,
    "PUBLISH_COOLDOWN": 5.0,
    "OUTBOX_GRACE": 30.0,
    "RELAY_MAX_ATTEMPTS": 10,
}
TOP_LEVEL_KEYS = ("DEFAULTS", "HANDLERS", *TOP_LEVEL_DEFAULTS)
DELIVERY_MODES = ("on_commit", "outbox")
INSTANCE_MODES = ("fresh", "snapshot")
ON_MISSING = ("skip", "raise", "snapshot")


def _is_number(value: object) -> bool:
    # Finite only: every number here is seconds, a rate or a count, and infinity would pass
    # each comparison and then fail at use (an OverflowError on every publish, say).
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _not_finite(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _must_be(key: str, option: Option, value: object) -> str:
    """The hint of a refused value: what the option takes."""
    finite = " (a finite one: not inf or nan)" if _not_finite(value) else ""
    return f"{key} must be {option.expected}{finite}."


def _non_negative(value: object) -> bool:
    return _is_number(value) and value >= 0  # type: ignore[operator]


def _is_rate(value: object) -> bool:
    """What Celery's worker accepts; anything else would stop it at start-up."""
    if not isinstance(value, str):
        return False
    try:
        rate(value)
    except (KeyError, ValueError, TypeError):
        return False
    return True


def _exception_list(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(item, str) or (isinstance(item, type) and issubclass(item, BaseException))
        for item in value
    )


@dataclass(frozen=True)
class Option:
    check: Callable[[object], bool]
    expected: str


#: Every option a handler can take, from ``DEFAULTS``, ``HANDLERS[name]`` or the decorator.
OPTIONS: dict[str, Option] = {
    # Retries, applied by the handler task itself (Celery's autoretry semantics).
    "max_retries": Option(
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        "a non-negative int, or None to retry forever",
    ),
    "autoretry_for": Option(_exception_list, "a list of dotted exception paths"),
    "dont_autoretry_for": Option(_exception_list, "a list of dotted exception paths"),
    "retry_backoff": Option(
        lambda v: isinstance(v, bool) or _non_negative(v), "a bool or a number of seconds"
    ),
    "retry_backoff_max": Option(_non_negative, "a non-negative number of seconds"),
    "retry_jitter": Option(lambda v: isinstance(v, bool), "a bool"),
    "default_retry_delay": Option(_non_negative, "a non-negative number of seconds"),
    # Read by the worker from the task.
    "acks_late": Option(lambda v: isinstance(v, bool), "a bool"),
    "reject_on_worker_lost": Option(lambda v: isinstance(v, bool), "a bool"),
    "rate_limit": Option(
        lambda v: v is None or _is_rate(v) or _non_negative(v),
        'a rate such as "10/s", "100/m", a number of tasks per second, or None',
    ),
    # Sent with every message.
    "time_limit": Option(lambda v: v is None or _non_negative(v), "a number of seconds"),
    "soft_time_limit": Option(lambda v: v is None or _non_negative(v), "a number of seconds"),
    "queue": Option(lambda v: isinstance(v, str) and bool(v), "a queue name"),
    "priority": Option(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255,
        "an int from 0 to 255",
    ),
    "countdown": Option(_non_negative, "a non-negative number of seconds"),
    "expires": Option(lambda v: v is None or _non_negative(v), "a number of seconds"),
    # How arguments travel.
    "instance": Option(lambda v: v in INSTANCE_MODES, " or ".join(map(repr, INSTANCE_MODES))),
    "on_missing": Option(lambda v: v in ON_MISSING, " or ".join(map(repr, ON_MISSING))),
    # How calls leave the request.
    "delivery": Option(lambda v: v in DELIVERY_MODES, " or ".join(map(repr, DELIVERY_MODES))),
    # How the worker runs the handler.
    "idempotent": Option(lambda v: isinstance(v, bool), "a bool"),
    "db_retry_window": Option(_non_negative, "a non-negative number of seconds (0: off)"),
    # One call per row and transaction (coalesce.py).
    "coalesce": Option(lambda v: isinstance(v, bool), "a bool"),
}


def _positive(value: object) -> bool:
    return _is_number(value) and value > 0  # type: ignore[operator]


TOP_LEVEL_OPTIONS: dict[str, Option] = {
    "EAGER": Option(lambda v: isinstance(v, bool), "True or False"),
    "EAGER_PROPAGATES": Option(lambda v: isinstance(v, bool), "True or False"),
    "DEAD_LETTERS": Option(lambda v: isinstance(v, bool), "True or False"),
    "DELIVERY": OPTIONS["delivery"],
    "PUBLISH_TIMEOUT": Option(_positive, "a positive number of seconds"),
    "PUBLISH_COOLDOWN": Option(_non_negative, "a non-negative number of seconds"),
    "OUTBOX_GRACE": Option(_non_negative, "a non-negative number of seconds"),
    "RELAY_MAX_ATTEMPTS": Option(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"
    ),
}

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
class Problem:
    """One thing wrong with the configuration; ``checks.py`` turns it into a system check."""

    id: str
    msg: str
    hint: str
    warning: bool = False


def option_problems(
    options: Mapping[str, Any], where: str, also_known: Iterable[str] = ()
) -> list[Problem]:
    """Validate one layer of handler options (``DEFAULTS``, ``HANDLERS[...]`` or decorator).

    Messages are sentences about ``where`` ("settings.DEFERRED_SIGNALS['DEFAULTS']",
    "Deferred handler 'x'"); ``also_known`` are other accepted words, for suggestions only.
    """
    problems = []
    for key, value in options.items():
        option = OPTIONS.get(key)
        if option is None:
            close = difflib.get_close_matches(str(key), [*OPTIONS, *also_known], n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                Problem(
                    "deferred_signals.E004",
                    f"{where} has an unknown option {key!r}{guess}.",
                    f"Use one of: {', '.join(sorted(OPTIONS))}.",
                )
            )
        elif not option.check(value):
            problems.append(
                Problem(
                    "deferred_signals.E005",
                    f"{where} sets {key!r} to {value!r} ({type(value).__name__}).",
                    _must_be(repr(key), option, value),
                )
            )
        elif key in ("autoretry_for", "dont_autoretry_for"):
            problems.extend(_exception_problems(value, where, key))
    if not problems:
        problems += filter(None, [limits_problem(options, where, "deferred_signals.E005")])
    return problems


def limits_problem(values: Mapping[str, Any], where: str, id: str) -> Problem | None:
    """A ``soft_time_limit`` above the ``time_limit``: Celery refuses to publish the message
    (``ValueError``), so each call would fail at its commit instead of where it is set."""
    hard, soft = values.get("time_limit"), values.get("soft_time_limit")
    if not (hard and soft and _is_number(hard) and _is_number(soft) and soft > hard):
        return None
    return Problem(
        id,
        f"{where} has soft_time_limit={soft!r} above its time_limit={hard!r}: Celery refuses "
        "to publish such a message, so no call of the handler would reach a worker.",
        "Make soft_time_limit lower than time_limit (the soft limit warns the handler "
        "before the hard limit stops it), or leave one of them unset.",
    )


def _exception_problems(paths: Iterable[object], where: str, key: str) -> list[Problem]:
    problems = []
    for path in paths:
        if not isinstance(path, str):
            continue
        try:
            exc = import_exception(path)
        except ImportError as error:
            problems.append(
                Problem(
                    "deferred_signals.E006",
                    f"{where} lists {path!r} in {key!r}, but it does not import ({error}).",
                    "Give the dotted path of an exception class, e.g. 'smtplib.SMTPException'.",
                )
            )
            continue
        if not (isinstance(exc, type) and issubclass(exc, BaseException)):
            problems.append(
                Problem(
                    "deferred_signals.E006",
                    f"{where} lists {path!r} in {key!r}, but it is not an exception class.",
                    "Give the dotted path of an exception class, e.g. 'smtplib.SMTPException'.",
                )
            )
    return problems


def settings_problems(raw: object) -> list[Problem]:
    """Everything wrong with a ``DEFERRED_SIGNALS`` value, handler names aside."""
    if not isinstance(raw, Mapping):
        return [
            Problem(
                "deferred_signals.E001",
                f"settings.{SETTING} is a {type(raw).__name__}, not a dict.",
                f'Write {SETTING} = {{"DEFAULTS": {{...}}, "HANDLERS": {{...}}}}.',
            )
        ]
    problems = [
        Problem(
            "deferred_signals.E002",
            f"settings.{SETTING} has an unknown key {key!r}.",
            f"Use one of: {', '.join(TOP_LEVEL_KEYS)}.",
        )
        for key in raw
        if key not in TOP_LEVEL_KEYS
    ]
    defaults = raw.get("DEFAULTS", {})
    if isinstance(defaults, Mapping):
        problems += option_problems(defaults, f"settings.{SETTING}['DEFAULTS']")
    else:
        problems.append(_not_a_dict(f"settings.{SETTING}['DEFAULTS']", defaults))
    handlers = raw.get("HANDLERS", {})
    if isinstance(handlers, Mapping):
        for name, options in handlers.items():
            where = f"settings.{SETTING}['HANDLERS'][{name!r}]"
            if isinstance(options, Mapping):
                problems += option_problems(options, where)
            else:
                problems.append(_not_a_dict(where, options))
    else:
        problems.append(_not_a_dict(f"settings.{SETTING}['HANDLERS']", handlers))
    for key, option in TOP_LEVEL_OPTIONS.items():
        if key in raw and not option.check(raw[key]):
            problems.append(
                Problem(
                    "deferred_signals.E008" if key == "DELIVERY" else "deferred_signals.E007",
                    f"settings.{SETTING}[{key!r}] is {raw[key]!r}.",
                    _must_be(key, option, raw[key]),
                )
            )
    return problems


def _not_a_dict(where: str, value: object) -> Problem:
    return Problem(
        "deferred_signals.E003",
        f"{where} is a {type(value).__name__}, not a dict.",
        "Give a dict of options, e.g. {'max_retries': 5, 'queue': 'signals'}.",
    )


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


def import_exception(path: str) -> Any:
    """``"smtplib.SMTPException"``, or a bare builtin name such as ``"ConnectionError"``."""
    if "." not in path:
        try:
            return getattr(builtins, path)
        except AttributeError:
            raise ImportError(f"{path!r} is not a builtin; give a dotted path") from None
    return import_string(path)


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
