"""System checks for ``settings.DEFERRED_SIGNALS`` (``manage.py check``)."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from typing import Any

from celery import current_app
from celery._state import get_current_app
from celery.exceptions import QueueNotFound
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.db import DEFAULT_DB_ALIAS, connections, router
from django.db.models.signals import ModelSignal, pre_save

from . import redelivery, registry
from .conf import conf
from .readiness import unconfigured_app, unconfigured_app_hint
from .schema import SETTING, TOP_LEVEL_KEYS, Problem, limits_problem, settings_problems

logger = logging.getLogger("deferred_signals")


@register(Tags.compatibility, "deferred_signals")  # manage.py check --tag deferred_signals
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    raw = getattr(settings, SETTING, {})
    problems = settings_problems(raw) + _misnamed_settings()
    if isinstance(raw, Mapping) and isinstance(raw.get("HANDLERS", {}), Mapping):
        problems += _unknown_handlers(raw.get("HANDLERS", {}))
    problems += _unknown_aliases()
    problems += task_name_clashes()
    problems += _before_the_write()
    problems += _model_label_senders()
    if not any(problem.id.startswith("deferred_signals.E") for problem in problems):
        problems += _redis_redelivery()  # merges options: needs valid settings
        problems += _time_limits()
        problems += _unroutable()
        problems += _unconfigured_celery_app()
    return [
        (Warning if problem.warning else Error)(problem.msg, hint=problem.hint, id=problem.id)
        for problem in problems
    ]


def _misnamed_settings() -> list[Problem]:
    """``DEFERRED_SIGNAL = {...}`` is read by nobody: its options would silently do nothing."""
    names = [name for name in dir(settings) if name.isupper() and name != SETTING]
    near = set(difflib.get_close_matches(SETTING, names, n=len(names), cutoff=0.85))
    near.update(name for name in names if name.startswith(SETTING[:-1]))  # DEFERRED_SIGNALS_EAGER
    return [
        Problem(
            "deferred_signals.W006",
            f"settings.{name} is not read by deferred_signals, which reads only "
            f"settings.{SETTING}: its value is ignored.",
            _misnamed_hint(name),
            warning=True,
        )
        for name in sorted(near)
    ]


def _misnamed_hint(name: str) -> str:
    # Not "rename it" where that is wrong: DEFERRED_SIGNALS = True, or a second dict that
    # would replace the project's DEFERRED_SIGNALS.
    key = name.removeprefix(f"{SETTING}_")
    if key in TOP_LEVEL_KEYS:
        return f"Make it the {key!r} key of {SETTING} ({SETTING} = {{{key!r}: ..., ...}})."
    if hasattr(settings, SETTING):
        return f"Move its keys into {SETTING}, and delete it."
    return (
        f"Rename it to {SETTING}, one dict with every key "
        f"({SETTING} = {{'DEFAULTS': {{...}}, 'EAGER': True, ...}})."
    )


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


#: Delays a message waits on the broker before a worker may start it.
DELAYS = ("countdown", "default_retry_delay", "retry_backoff_max")
#: How long a message may stay unacknowledged while it runs (acks_late, the default).
RUN_TIMES = ("time_limit", "soft_time_limit")


def _redis_redelivery() -> list[Problem]:
    """Redis redelivers a message unacknowledged for ``visibility_timeout``: longer delays loop."""
    timeout = redelivery.visibility_timeout(current_app)
    if timeout is None:
        return []
    problems = []
    for handler in registry.all_handlers():
        merged = handler.merged
        for key in (*DELAYS, *RUN_TIMES):
            delay = merged.get(key)
            if key == "retry_backoff_max" and not merged.get("retry_backoff"):
                continue
            if delay is not None and delay >= timeout:
                what = "waits" if key in DELAYS else "runs"
                problems.append(
                    Problem(
                        "deferred_signals.W002",
                        f"Deferred handler {handler.name!r} has {key}={delay!r} s, at least "
                        f"Redis's visibility_timeout ({timeout} s): the message would be "
                        f"redelivered again and again while it {what}.",
                        f"Lower {key}, or raise broker_transport_options['visibility_timeout'].",
                        warning=True,
                    )
                )
    return problems


def _before_the_write() -> list[Problem]:
    """Deferred handlers of ``pre_save``: outside ``atomic()`` Django sends it before the row
    is written and outside any transaction, so nothing holds the call back: it is published
    at once, before the write, and even if the save then fails."""
    return [
        Problem(
            "deferred_signals.W004",
            f"Deferred handler {handler.name!r} listens to pre_save: outside "
            "transaction.atomic() Django sends it before the row is written, in no "
            "transaction, so the call is published at once, before the write and even if the "
            "save then fails.",
            "Connect it to post_save (it gets the same instance, update_fields, raw and "
            "using, once the row is written), or silence this warning if every save of its "
            "model runs inside atomic().",
            warning=True,
        )
        for handler in registry.all_handlers()
        if any(signal is pre_save for signal, _, _ in handler.connections)
    ]


def _model_label_senders() -> list[Problem]:
    """Deferred handlers connected to a plain ``Signal`` with an "app_label.Model" str as
    sender. Only model signals resolve such a str; a plain signal compares senders by
    identity, so a send with the model class never reaches the handler. A warning, not an
    error: a project that sends that very str (``sender=settings.AUTH_USER_MODEL``) is right.
    """
    from django.apps import apps

    problems: list[Problem] = []
    for handler in registry.all_handlers():
        for signal, sender, _ in handler.connections:
            if not isinstance(sender, str) or isinstance(signal, ModelSignal):
                continue
            try:
                model = apps.get_model(sender)
            except (LookupError, ValueError):  # not a model label: a sender like any
                continue
            problems.append(
                Problem(
                    "deferred_signals.W005",
                    f"Deferred handler {handler.name!r} has sender={sender!r} on a signal "
                    "that is not a model signal: only model signals (post_save, ...) resolve "
                    "'app_label.Model' strings; this one compares senders as they are, so a "
                    f"send with sender={model.__name__} never reaches the handler.",
                    f"Connect it with the class, sender={model.__name__}, or silence this "
                    "warning if the signal is sent with this very string as its sender.",
                    warning=True,
                )
            )
    return problems


def _time_limits() -> list[Problem]:
    """A handler whose limits, once merged, put the soft one above the hard one.

    Read from its task, so Celery's ``task_time_limit`` / ``task_soft_time_limit`` count
    where the handler's options leave a limit unset.
    """
    problems: list[Problem] = []
    for handler in registry.all_handlers():
        limits = {
            "time_limit": handler.task.time_limit,
            "soft_time_limit": handler.task.soft_time_limit,
        }
        where = f"Deferred handler {handler.name!r}"
        problems += filter(None, [limits_problem(limits, where, "deferred_signals.E011")])
    return problems


def _unroutable() -> list[Problem]:
    """A handler whose queue Celery refuses to route to: not in ``task_queues`` while
    ``task_create_missing_queues`` is off. Routing is Celery's, without I/O, as a publish
    does it; other routing errors (a router function failing) are left to the publish."""
    app = current_app
    problems: list[Problem] = []
    for handler in registry.all_handlers():
        queue = handler.merged.publish.get("queue")
        try:
            app.amqp.router.route(
                {"queue": queue} if queue else {}, handler.name, task_type=handler.task
            )
        except QueueNotFound as error:
            problems.append(
                Problem(
                    "deferred_signals.E012",
                    f"Deferred handler {handler.name!r} is routed to a queue Celery does not "
                    f"know ({error}), and task_create_missing_queues is off: Celery refuses "
                    "every message of the handler, so none reaches a worker: each call is "
                    "spilled to the outbox at its commit, and the relay, refused too, retries "
                    "it RELAY_MAX_ATTEMPTS times before it keeps it as a dead letter (or drops "
                    "it, with DEAD_LETTERS off).",
                    "Add the queue to task_queues, or give the handler a queue that is there "
                    "(its queue option, or task_routes).",
                )
            )
        except Exception:  # a router that fails: not ours to report, the publish logs it
            continue
    return problems


def task_name_clashes() -> list[Problem]:
    """Handler names (and aliases) that are another Celery task's name, or Celery's own.

    Celery keeps the first task registered under a name: either the handler's task is never
    run (a message for it runs the other task, with the handler's arguments), or the other
    task's ``delay()`` runs the handler. ``manage.py check`` sees the tasks imported by then;
    a worker checks again once it has imported its task modules (:func:`connect_worker_check`).
    """
    from .tasks import DeferredHandlerTask

    names = {
        name: handler.name
        for handler in registry.all_handlers()
        for name in (handler.name, *handler.aliases)
    }
    if not names:
        return []
    app = current_app
    problems = []
    for name, handler in sorted(names.items()):
        task = app.tasks.get(name)
        theirs = task is not None and not isinstance(task, DeferredHandlerTask)
        if not (theirs or name.startswith("celery.")):
            continue
        other = (
            f"the Celery task {type(task).__module__}.{type(task).__qualname__}"
            if theirs
            else "a name Celery reserves for its own tasks"
        )
        what = "Deferred handler" if name == handler else "An alias of deferred handler"
        problems.append(
            Problem(
                "deferred_signals.E010",
                f"{what} {handler!r} is named {name!r}, which is {other}: Celery keeps one "
                "task per name, so a message for one runs the other.",
                "Give the handler another name= (with aliases=[...] for messages already "
                "queued under the old one), or rename the Celery task.",
            )
        )
    return problems


def connect_worker_check() -> None:
    """Log each clash of :func:`task_name_clashes` when a worker starts (its modules are
    imported by then): the worker would run the wrong code for that name."""
    from celery.signals import worker_init

    worker_init.connect(_check_worker_tasks, weak=False, dispatch_uid="deferred_signals")


def _check_worker_tasks(**kwargs: Any) -> None:
    for problem in task_name_clashes():
        logger.error("%s Fix: %s (%s)", problem.msg, problem.hint, problem.id)


def _unknown_aliases() -> list[Problem]:
    return [
        Problem(
            "deferred_signals.E009",
            f"Deferred handler {handler.name!r} has using={handler.using!r}, which is not a "
            "database alias.",
            f"Use one of settings.DATABASES: {', '.join(connections.settings)}.",
        )
        for handler in registry.all_handlers()
        if handler.using is not None and handler.using not in connections.settings
    ]


def _unconfigured_celery_app() -> list[Problem]:
    """Publishing through Celery's fallback app sends to a broker nobody configured."""
    if (
        conf.eager
        or not any(True for _ in registry.all_handlers())
        or current_app.conf.broker_url
        or current_app.conf.task_always_eager  # tasks run in place: no broker is reached
    ):
        return []
    return [
        Problem(
            "deferred_signals.W003",
            unconfigured_app(current_app),
            unconfigured_app_hint(get_current_app()),  # the app itself, not current_app's proxy
            warning=True,
        )
    ]


@register(Tags.database, "deferred_signals")  # manage.py check --database ALIAS; migrate
def check_outbox_tables(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """An alias that sends deferred calls needs the outbox table: spills and outbox writes go
    to the database of the transaction. A warning, not an error: ``migrate`` runs database
    checks before it creates the table."""
    from .models import OutboxCall
    from .outbox_status import has_outbox

    senders = {DEFAULT_DB_ALIAS} | {h.using for h in registry.all_handlers() if h.using}
    table = OutboxCall._meta.db_table
    found: list[CheckMessage] = []
    for alias in databases or ():
        if alias not in connections.settings:
            continue
        if has_outbox(alias):
            missing = _missing_columns(alias)
            if missing:
                found.append(
                    Warning(
                        f"Database {alias!r} has an outbox table ({table}) without the "
                        f"column(s) {', '.join(missing)} this version writes: calls that "
                        "cannot be published at commit would be lost, delivery='outbox' "
                        "handlers fail at send time and the relay cannot claim rows.",
                        hint=f"Run `manage.py migrate deferred_signals --database={alias}` "
                        "before deploying this version.",
                        id="deferred_signals.W011",
                    )
                )
        elif (alias in senders or router.allow_migrate_model(alias, OutboxCall)) and _migrated(
            alias
        ):
            found.append(
                Warning(
                    f"Database {alias!r} sends deferred calls but has no outbox table "
                    f"({table}): calls that cannot be published at commit would be lost, and "
                    "delivery='outbox' handlers fail at send time.",
                    hint=f"Run `manage.py migrate deferred_signals --database={alias}` (and let "
                    "your database routers allow it).",
                    id="deferred_signals.W010",
                )
            )
    return found


def _missing_columns(alias: str) -> list[str]:
    """The outbox columns this version writes that ``alias``'s outbox table lacks."""
    from .models import OutboxCall

    connection = connections[alias]
    try:
        with connection.cursor() as cursor:
            found = {
                column.name
                for column in connection.introspection.get_table_description(
                    cursor, OutboxCall._meta.db_table
                )
            }
    except Exception:
        return []
    columns = [field.column for field in OutboxCall._meta.concrete_fields]
    return [column for column in columns if column is not None and column not in found]


def _migrated(alias: str) -> bool:
    """Whether ``migrate`` has ever run on ``alias``: the first ``migrate`` of a new database
    runs this check before it creates any table, and must not be told to run itself."""
    from django.db.migrations.recorder import MigrationRecorder

    try:
        return bool(MigrationRecorder(connections[alias]).has_table())
    except Exception:
        return False
