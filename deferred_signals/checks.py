"""System checks for ``settings.DEFERRED_SIGNALS`` (``manage.py check``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from . import registry
from .conf import SETTING, Problem, settings_problems


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    raw = getattr(settings, SETTING, {})
    problems = settings_problems(raw)
    if isinstance(raw, Mapping) and isinstance(raw.get("HANDLERS", {}), Mapping):
        problems += _unknown_handlers(raw.get("HANDLERS", {}))
    return [
        (Warning if problem.warning else Error)(problem.msg, hint=problem.hint, id=problem.id)
        for problem in problems
    ]


def _unknown_handlers(handlers: Mapping[str, Any]) -> list[Problem]:
    known = {handler.name for handler in registry.all_handlers()}
    return [
        Problem(
            "deferred_signals.W001",
            f"settings.{SETTING}['HANDLERS'] configures {name!r}, but no deferred handler "
            "is registered under that name.",
            "Use the handler's registered name (module.qualname, or its name=...); "
            f"registered: {', '.join(sorted(known)) or 'none'}.",
            warning=True,
        )
        for name in handlers
        if name not in known
    ]
