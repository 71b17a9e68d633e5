"""``settings.DEFERRED_SIGNALS``' schema: every option, what it takes, and what is wrong.

:func:`settings_problems` and :func:`option_problems` list what is wrong with a value as
:class:`Problem` objects, which ``checks.py`` turns into system checks and the decorator into
errors at registration. Merging the layers into each handler's options is :mod:`conf`'s job.
"""

from __future__ import annotations

import builtins
import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celery.utils.time import rate
from django.utils.module_loading import import_string

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


def import_exception(path: str) -> Any:
    """``"smtplib.SMTPException"``, or a bare builtin name such as ``"ConnectionError"``."""
    if "." not in path:
        try:
            return getattr(builtins, path)
        except AttributeError:
            raise ImportError(f"{path!r} is not a builtin; give a dotted path") from None
    return import_string(path)
