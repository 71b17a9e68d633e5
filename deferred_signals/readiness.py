"""Is this process set up to defer calls? Asked at every deferred call, answered from a cache.

``manage.py check`` reports setup mistakes only to those who run it; these are the ones that
would otherwise pass silently at run time, so the first deferred call raises instead, in the
request or the developer's own tests.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, _state
from celery._state import get_current_app
from django.apps import apps
from django.core.signals import setting_changed
from django.dispatch import receiver as django_receiver

from .conf import conf
from .exceptions import DeferredSignalConfigError

APP = "deferred_signals"
UNCONFIGURED_APP_HINT = (
    "Import your Celery app when Django starts (proj/__init__.py: `from .celery import "
    "app as celery_app`) and configure its broker, or set EAGER for development."
)


def unconfigured_app_hint(app: Celery) -> str:
    """The fix for an app without a broker: which slip it is depends on the app current."""
    # Celery's fallback app (made with no fixups): the project's own app was never imported.
    # Not the default app alone: Celery's Django fixup makes the project's first app that too.
    if app is getattr(_state, "default_app", None) and not app.fixups:
        return UNCONFIGURED_APP_HINT
    # The project's app is there: its broker setting is what is missing or misnamed.
    your_app = f"your Celery app {app.main!r}" if app.main else "your Celery app"  # Celery()
    namespace = getattr(app, "namespace", None)  # config_from_object(..., namespace=)
    if namespace:
        ignored = "".join(
            f"; settings.{name} is not one of its settings" for name in _misnamed(app, namespace)
        )
        return (
            f"Set {namespace}_BROKER_URL in your settings ({your_app} reads them with "
            f"namespace={namespace!r}{ignored}), or set EAGER for development."
        )
    return (
        f"Give {your_app} a broker: Celery(..., broker=...), or broker_url in the object it "
        "is configured from; or set EAGER for development."
    )


def _misnamed(app: Celery, namespace: str) -> list[str]:
    """Broker-like names in the app's configuration source that Celery does not read with
    ``namespace``: ``CELERY_BROKER`` for ``CELERY_BROKER_URL``. The user set one, and
    wonders why it is not read. (Celery still reads the unprefixed ``BROKER_URL``.)"""
    from celery.app.defaults import DEFAULTS
    from celery.utils.imports import symbol_by_name

    try:
        source = getattr(app, "_config_source", None)  # what config_from_object was given
        if isinstance(source, str):
            source = symbol_by_name(source)
        names = list(source) if isinstance(source, dict) else dir(source)
    except Exception:  # a hint, not a reason to fail the check
        return []
    known = set(DEFAULTS)  # every setting, lowercase and flattened: "broker_url"
    prefix = f"{namespace}_"
    return sorted(
        name
        for name in names
        if isinstance(name, str)
        and "BROKER" in name
        and name.startswith(prefix)
        and name[len(prefix) :].lower() not in known
    )


#: (the Celery app current when the verdict was reached, the error or None); None: not known.
_verdict: tuple[Celery, str | None] | None = None


def check() -> None:
    """Raise :class:`DeferredSignalConfigError` if a deferred call cannot be made here."""
    global _verdict
    app = get_current_app()
    verdict = _verdict
    # Keyed on the app: the current app may change (a project's app imported late, tests).
    if verdict is None or verdict[0] is not app:
        verdict = (app, _problem(app))
        if apps.ready:  # a call made while apps load is asked again later
            _verdict = verdict
    if verdict[1] is not None:
        if _capturing() and verdict[1].startswith(unconfigured_app(app)):
            return  # a test captures the calls: nothing is published, no broker is needed
        raise DeferredSignalConfigError(verdict[1])


def _capturing() -> bool:
    from . import dispatch  # not at import time: dispatch imports the worker side

    return dispatch.capture is not None


def unconfigured_app(app: Celery) -> str:
    """The problem of publishing through an app without a broker (check W003 says it too)."""
    return (
        f"The current Celery app ({app.main!r}) has no broker_url: deferred handlers "
        "would publish to Celery's built-in default (amqp://localhost)."
    )


def _problem(app: Celery) -> str | None:
    if apps.apps_ready and not apps.is_installed(APP):
        # Without the app, check would not validate DEFERRED_SIGNALS, the management command
        # would not exist and the outbox tables would not be migrated.
        return (
            f"{APP!r} is not in INSTALLED_APPS, so `manage.py check` does not validate "
            f"settings.DEFERRED_SIGNALS and `manage.py {APP}` does not exist. "
            f'Fix: add "{APP}" to INSTALLED_APPS.'
        )
    # With task_always_eager, Celery runs tasks in place and never reaches the broker.
    if not conf.eager and not app.conf.broker_url and not app.conf.task_always_eager:
        return f"{unconfigured_app(app)} Fix: {unconfigured_app_hint(app)}"
    return None


@django_receiver(setting_changed)
def _forget_on_setting_changed(**kwargs: Any) -> None:
    # Any setting may matter (INSTALLED_APPS, DEFERRED_SIGNALS, a CELERY_* one read late) and
    # settings change only in tests: start over.
    global _verdict
    _verdict = None
