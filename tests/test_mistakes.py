"""Unit and SQLite layers: a user's mistakes are reported early, completely and in sentences.

A typo in a handler's parameters, a missing app, an unconfigured Celery app, a misspelt option:
each fails in the request (or at import), where the developer's own tests see it, rather than
on a worker later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery, current_app
from celery import _state as celery_state
from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_save
from django.dispatch import Signal
from django.test import override_settings

from deferred_signals import (
    DeferredSignalConfigError,
    DeferredSignalError,
    DuplicateHandlerError,
    connect,
    receiver,
    registry,
)
from deferred_signals.checks import check_settings
from tests.testapp.models import Article

CALLS: list[dict[str, Any]] = []


@contextmanager
def deferred(signal: Signal, func: Callable[..., Any], **kwargs: Any) -> Iterator[registry.Handler]:
    connect(signal, func, defer=True, **kwargs)
    handler = registry.get(kwargs.get("name") or f"{func.__module__}.{func.__qualname__}")
    assert handler is not None
    CALLS.clear()
    try:
        yield handler
    finally:
        signal.disconnect(func, sender=kwargs.get("sender"))
        registry.unregister(handler.name)
        CALLS.clear()


def on_save(sender: Any, instance: Any, creatd: bool, **kwargs: Any) -> None:  # the typo
    CALLS.append({"instance": instance, "creatd": creatd})


def with_default(sender: Any, instance: Any, creatd: bool = False, **kwargs: Any) -> None:
    CALLS.append({"instance": instance, "creatd": creatd})


def positional_only(sender: Any, /, **kwargs: Any) -> None:
    CALLS.append(kwargs)


def fine(sender: Any, signal: Signal, **kwargs: Any) -> None:
    CALLS.append(kwargs)


# --- 1. the handler's signature is checked at send time ---------------------------------------

# Outside a transaction calls run at once (EAGER in the test settings).
pytestmark = pytest.mark.django_db(transaction=True)


def test_a_misspelt_parameter_fails_in_the_request_naming_handler_and_parameter() -> None:
    signal = Signal()
    with deferred(signal, on_save):
        with pytest.raises(DeferredSignalError) as raised:
            signal.send(sender=None, instance="row", created=True)
        message = str(raised.value)
        assert f"'{__name__}.on_save'" in message
        assert "requires parameter 'creatd'" in message
        assert "created, instance, sender, signal" in message
        assert CALLS == []  # nothing was deferred


def test_the_check_follows_the_argument_names_of_each_send() -> None:
    signal = Signal()
    with deferred(signal, on_save):
        signal.send(sender=None, instance="row", creatd=True)  # accepted, then cached...
        assert CALLS == [{"instance": "row", "creatd": True}]
        with pytest.raises(DeferredSignalError, match="'creatd'"):  # ...for those names only
            signal.send(sender=None, instance="row")
    with deferred(signal, with_default):
        signal.send(sender=None, instance="row", created=True)
        assert CALLS == [{"instance": "row", "creatd": False}]


def test_positional_only_parameters_cannot_be_filled_by_the_worker() -> None:
    signal = Signal()
    with deferred(signal, positional_only), pytest.raises(DeferredSignalError, match="positional"):
        signal.send(sender=None)


# --- 3. what the README's opening promises, and what it does not ------------------------------


@pytest.mark.parametrize("mode", ["snapshot", "fresh"])
def test_attributes_that_are_not_fields_are_dropped_even_in_snapshots(mode: str) -> None:
    def on_article(sender: Any, instance: Article, **kwargs: Any) -> None:
        CALLS.append({"title": instance.title, "by": getattr(instance, "_changed_by", None)})

    with deferred(post_save, on_article, sender=Article, name="tests.by", instance=mode):
        with transaction.atomic():
            article = Article(title="t")
            article._changed_by = "alice"  # type: ignore[attr-defined]
            article.save()
        assert CALLS == [{"title": "t", "by": None}]  # only field values travel


# --- 5. setup mistakes --------------------------------------------------------------------


def test_without_the_app_installed_the_first_call_names_the_fix() -> None:
    signal = Signal()
    installed = [app for app in settings.INSTALLED_APPS if app != "deferred_signals"]
    with deferred(signal, fine):
        with (
            override_settings(INSTALLED_APPS=installed),
            pytest.raises(
                DeferredSignalConfigError, match='add "deferred_signals" to INSTALLED_APPS'
            ),
        ):
            signal.send(sender=None, x=1)
        signal.send(sender=None, x=2)  # the verdict is re-evaluated once settings change
        assert CALLS == [{"x": 2}]


@pytest.fixture
def unconfigured_app() -> Iterator[Celery]:
    previous = current_app._get_current_object()
    app = Celery("unconfigured", set_as_current=True)
    yield app
    previous.set_current()


def test_an_unconfigured_celery_app_refuses_to_publish(unconfigured_app: Celery) -> None:
    signal = Signal()
    with deferred(signal, fine):
        with (
            override_settings(DEFERRED_SIGNALS={"EAGER": False}),
            pytest.raises(
                DeferredSignalConfigError, match=r"\('unconfigured'\) has no broker_url"
            ) as raised,
        ):
            signal.send(sender=None, x=1)
        # The project's app is current: importing it is not the fix, giving it a broker is.
        assert "Import your Celery app when Django starts" not in str(raised.value)
        assert "Give your Celery app 'unconfigured' a broker" in str(raised.value)
        signal.send(sender=None, x=2)  # EAGER (the test settings) needs no broker
        assert CALLS == [{"x": 2}]


def test_a_misnamed_broker_setting_is_named_not_the_import_of_the_app() -> None:
    """CELERY_BROKER = ... (not _URL) in a project whose app is imported: the hint told the
    user to import the app they had imported, and not which setting was missing."""
    previous = current_app._get_current_object()
    app = Celery("proj", set_as_current=True)
    app.config_from_object({"CELERY_BROKER": "redis://127.0.0.1:6379/0"}, namespace="CELERY")
    try:
        with override_settings(DEFERRED_SIGNALS={"EAGER": False}):
            (warning,) = [m for m in check_settings() if m.id == "deferred_signals.W003"]
            signal = Signal()
            with deferred(signal, fine), pytest.raises(DeferredSignalConfigError) as raised:
                signal.send(sender=None, x=1)
    finally:
        previous.set_current()
    hint = "Set CELERY_BROKER_URL in your settings (your Celery app 'proj' reads them with"
    assert warning.hint.startswith(hint) and "Import your Celery app" not in warning.hint
    assert f"Fix: {hint}" in str(raised.value)
    # The name set is the one named: the user sees why it is not read.
    assert "settings.CELERY_BROKER is not one of its settings" in warning.hint


@pytest.mark.parametrize("name", ["CELERY_BROKER_URI", "CELERY_BROKER_HOST_URL"])
def test_a_misnamed_broker_setting_in_django_settings_is_named(name: str) -> None:
    """The usual project: config_from_object("django.conf:settings", namespace="CELERY")."""
    previous = current_app._get_current_object()
    app = Celery("proj", set_as_current=True)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    try:
        with override_settings(
            DEFERRED_SIGNALS={"EAGER": False}, CELERY_BROKER_URL=None, **{name: "redis://x"}
        ):
            (warning,) = [m for m in check_settings() if m.id == "deferred_signals.W003"]
    finally:
        previous.set_current()
    assert f"settings.{name} is not one of its settings" in warning.hint
    assert "CELERY_TASK_ALWAYS_EAGER" not in warning.hint  # a real setting is not named


def test_the_projects_app_is_not_taken_for_celerys_fallback_once_it_is_the_default() -> None:
    """In a real start-up the project's app is the first Celery app, and Celery's Django
    fixup makes it the default app too: the hint took it for the fallback and told the user
    to import the app they had imported, not to set CELERY_BROKER_URL."""
    previous, default = current_app._get_current_object(), celery_state.default_app
    celery_state.default_app = None  # a fresh process: no Celery app made yet
    try:
        app = Celery("proj", set_as_current=True)
        app.config_from_object({"CELERY_BROKER": "redis://127.0.0.1:6379/0"}, namespace="CELERY")
        assert celery_state.default_app is app  # the fixup's doing, as in every Django project
        with override_settings(DEFERRED_SIGNALS={"EAGER": False}):
            (warning,) = [m for m in check_settings() if m.id == "deferred_signals.W003"]
    finally:
        celery_state.default_app = default
        previous.set_current()
    assert warning.hint.startswith("Set CELERY_BROKER_URL in your settings")


def test_a_celery_app_made_without_a_name_is_not_called_none() -> None:
    # Celery() is how Celery's own guide starts an app: main is None.
    previous = current_app._get_current_object()
    Celery(set_as_current=True)
    try:
        with override_settings(DEFERRED_SIGNALS={"EAGER": False}):
            (warning,) = [m for m in check_settings() if m.id == "deferred_signals.W003"]
    finally:
        previous.set_current()
    assert warning.hint.startswith("Give your Celery app a broker: Celery(..., broker=...)")


def test_without_the_projects_app_the_fix_is_to_import_it() -> None:
    previous, default = current_app._get_current_object(), celery_state.default_app
    # As when proj/__init__.py does not import the app: Celery makes its fallback app.
    celery_state._tls.current_app = celery_state.default_app = None
    try:
        with override_settings(DEFERRED_SIGNALS={"EAGER": False}):
            (warning,) = [m for m in check_settings() if m.id == "deferred_signals.W003"]
    finally:
        celery_state.default_app = default
        previous.set_current()
    assert "('default') has no broker_url" in warning.msg
    assert warning.hint.startswith("Import your Celery app when Django starts")


# --- 7. error messages --------------------------------------------------------------------


def test_every_problem_of_a_decorator_call_is_reported_at_once_in_sentences() -> None:
    with pytest.raises(DeferredSignalConfigError) as raised:
        receiver(
            [Signal(), "post_save"],  # type: ignore[list-item]
            defer=True,
            queu="crm",
            max_retries=-1,
            instance="copy",
            using=1,
        )(fine)
    message = str(raised.value)
    name = f"'{__name__}.fine'"
    assert message.startswith(f"Deferred handler {name} cannot be registered (5 problems):\n")
    assert f"- Deferred handler {name} has an unknown option 'queu' (did you mean 'queue'?)." in (
        message
    )
    assert f"- Deferred handler {name} sets 'max_retries' to -1 (int)." in message
    assert "'instance' must be 'fresh' or 'snapshot'" in message
    assert "using=1" in message and "'post_save', which is not a django.dispatch.Signal" in message
    assert registry.get(f"{__name__}.fine") is None


def test_a_soft_time_limit_above_the_hard_one_fails_at_registration() -> None:
    with pytest.raises(DeferredSignalConfigError) as raised:
        connect(Signal(), fine, defer=True, time_limit=5, soft_time_limit=10)
    assert str(raised.value).startswith(
        f"Deferred handler '{__name__}.fine' has soft_time_limit=10 above its time_limit=5: "
        "Celery refuses to publish such a message"
    )
    assert registry.get(f"{__name__}.fine") is None


def test_limits_that_conflict_once_merged_fail_in_the_request_not_at_commit() -> None:
    """time_limit in DEFAULTS, soft_time_limit on the decorator: each fine alone, but Celery
    would refuse every message of the handler when its transaction commits."""
    signal = Signal()
    with (
        override_settings(DEFERRED_SIGNALS={"EAGER": True, "DEFAULTS": {"time_limit": 5}}),
        deferred(signal, fine, soft_time_limit=10),
        pytest.raises(DeferredSignalConfigError) as raised,
        transaction.atomic(),
    ):
        signal.send(sender=None, x=1)
    assert str(raised.value).startswith(
        f"Deferred handler '{__name__}.fine' has soft_time_limit=10 above its time_limit=5"
    )
    assert str(raised.value).endswith("(deferred_signals.E011)")
    assert CALLS == []


def test_a_method_decorated_in_its_class_body_fails_at_registration() -> None:
    """The decorator gets the plain function: nothing would ever pass ``self``."""

    class Indexer:
        def on_save(self, sender: Any, **kwargs: Any) -> None:
            pass

        @staticmethod
        def static(sender: Any, signal: Signal, **kwargs: Any) -> None:
            CALLS.append(kwargs)

    on_save = Indexer.on_save
    with pytest.raises(DeferredSignalConfigError) as raised:
        receiver(Signal(), defer=True, name="tests.indexer_on_save")(on_save)
    assert str(raised.value) == (
        "Deferred handler 'tests.indexer_on_save' takes 'self' first, as a method decorated "
        "in its class body does: the decorator connects the plain function, and nothing "
        "passes self. Connect the method of an object instead, connect(signal, "
        "obj.on_save, defer=True), or make it a module-level function or a staticmethod "
        "(@staticmethod above @receiver)."
    )
    assert registry.get("tests.indexer_on_save") is None
    # A bound method and a staticmethod are fine.
    signal = Signal()
    with (
        deferred(signal, Indexer().on_save, name="tests.indexer_bound"),
        deferred(signal, Indexer.static, name="tests.indexer_static"),
    ):
        signal.send(sender=None, x=1)
        assert CALLS == [{"x": 1}]


@pytest.mark.parametrize("make", ["shared_task", "app.task"])
def test_a_celery_task_as_the_handler_fails_at_registration(make: str) -> None:
    """The habit of the signal-to-task idiom: ``@receiver(..., defer=True)`` stacked on
    ``@shared_task``. The handler's own task would take the task's name, which Celery keeps
    for the first: every call then went to the user's task with our message as its kwargs."""
    from celery import shared_task

    def on_paid(sender: Any, **kwargs: Any) -> None:
        pass

    name = f"tests.on_paid_{make}"
    decorate = shared_task if make == "shared_task" else current_app.task
    task = decorate(name=name)(on_paid)
    try:
        with pytest.raises(DeferredSignalConfigError) as raised:
            receiver(Signal(), defer=True, name="tests.on_paid_handler")(task)
    finally:
        current_app.tasks.pop(name, None)
    assert str(raised.value) == (
        "Deferred handler 'tests.on_paid_handler' is a Celery task (@shared_task or @app.task "
        "under @receiver): defer=True makes a task of the plain function itself. Remove the "
        "task decorator."
    )
    assert registry.get("tests.on_paid_handler") is None


@pytest.mark.parametrize("name", ["pre_init", "post_init"])
def test_instance_creation_signals_cannot_be_deferred(name: str) -> None:
    """Sent for every row loaded, the worker's own fetch included: a call that sends itself
    again, without end (one save loaded one row: hundreds of tasks a second)."""
    from django.db.models import signals

    with pytest.raises(DeferredSignalConfigError) as raised:
        receiver(getattr(signals, name), sender=Article, defer=True)(fine)
    assert str(raised.value).startswith(
        f"Deferred handler '{__name__}.fine' is connected to {name}, which Django sends each "
        "time a model instance is made in memory"
    )
    assert "Connect it without defer=True." in str(raised.value)
    assert registry.get(f"{__name__}.fine") is None
    receiver(getattr(signals, name), sender=Article)(fine)  # a plain receiver: Django's
    getattr(signals, name).disconnect(fine, sender=Article)


SAVES: list[int] = []


def saves_its_own_row(sender: Any, instance: Article, **kwargs: Any) -> None:
    SAVES.append(instance.pk)
    if len(SAVES) < 3:  # a real one would not stop: each run publishing the next, forever
        instance.title = f"{instance.title}!"
        instance.save(update_fields=["title"])


def test_a_handler_that_saves_its_own_row_is_told_it_calls_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    SAVES.clear()
    with (
        deferred(post_save, saves_its_own_row, sender=Article) as handler,
        caplog.at_level("WARNING", logger="deferred_signals"),
    ):
        article = Article.objects.create(title="loop")  # EAGER: each run inline at its commit
    assert [article.pk, article.pk, article.pk] == SAVES
    warnings = [r.getMessage() for r in caplog.records if "to itself" in r.getMessage()]
    # The second run deferred the very call it served (same row, update_fields=["title"]),
    # which a loop does at each run from then on; the first run's call differed from its own
    # (created=True), as a guarded save's does (see the test below).
    assert len(warnings) == 1
    assert warnings[0].startswith(f"Deferred handler {handler.name}, running for call ")
    assert f"deferred a call to itself for <testapp.article pk={article.pk}>" in warnings[0]
    assert "look at update_fields or created" in warnings[0]
    caplog.clear()
    with deferred(post_save, on_other_rows, sender=Article):
        plain = Article.objects.create(title="plain")
    parent = Article.objects.get(title="parent")
    assert SAVES[3:] == [plain.pk, parent.pk]  # it ran for the row, then for the other one
    assert not [r for r in caplog.records if "to itself" in r.getMessage()]


def guarded(sender: Any, instance: Article, update_fields: Any = None, **kwargs: Any) -> None:
    """The fix the warning itself advises: a run for its own update_fields stops the chain."""
    SAVES.append(instance.pk)
    if update_fields and "title" in update_fields:
        return
    instance.title = instance.title.strip()
    instance.save(update_fields=["title"])


def saves_plainly(sender: Any, instance: Article, **kwargs: Any) -> None:
    SAVES.append(instance.pk)
    if len(SAVES) < 4:
        instance.save()  # each run's call: created=False, update_fields=None, as the one served


def test_a_guarded_save_of_its_own_row_is_not_told_it_calls_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Warned at each run, a handler written as the warning says would teach people to
    ignore it: its one extra run carries other arguments than the first, and ends the chain."""
    SAVES.clear()
    with (
        deferred(post_save, guarded, sender=Article),
        caplog.at_level("WARNING", logger="deferred_signals"),
    ):
        first = Article.objects.create(title=" one ")
        second = Article.objects.create(title=" two ")
    assert [first.pk, first.pk, second.pk, second.pk] == SAVES  # two runs each, then it ends
    assert not [r for r in caplog.records if "to itself" in r.getMessage()]
    SAVES.clear()
    with (
        deferred(post_save, saves_plainly, sender=Article),
        caplog.at_level("WARNING", logger="deferred_signals"),
    ):
        looping = Article.objects.create(title="loop")
    assert [looping.pk] * 4 == SAVES
    warnings = [r for r in caplog.records if "to itself" in r.getMessage()]
    assert len(warnings) == 2  # the second and third runs: each deferred the call it served


def on_other_rows(sender: Any, instance: Article, **kwargs: Any) -> None:
    """Saves another row of the model once (a parent's counter): a chain that ends, said
    nothing about."""
    SAVES.append(instance.pk)
    if instance.title == "plain":
        Article.objects.create(title="parent")


def test_a_model_label_as_sender_of_a_plain_signal_is_a_check_warning_not_a_refusal() -> None:
    """Only model signals resolve "app_label.Model": a plain Signal compares the str with the
    sender sent, so a send with the class never reaches the handler (W005). But a project that
    sends that very str (``sender=settings.AUTH_USER_MODEL``) is right, and Django matches it:
    registration must not refuse it, and its calls must run."""

    signal = Signal()
    label = settings.AUTH_USER_MODEL  # the same str object at each read
    with deferred(signal, fine, sender=label):
        signal.send(sender=settings.AUTH_USER_MODEL, x=1)
        assert CALLS == [{"x": 1}]
        (warning,) = [m for m in check_settings() if m.id == "deferred_signals.W005"]
        assert warning.level == 30  # a Warning: silenced by a project that means it
        assert warning.msg == (
            f"Deferred handler '{__name__}.fine' has sender='auth.User' on a signal that is "
            "not a model signal: only model signals (post_save, ...) resolve 'app_label.Model' "
            "strings; this one compares senders as they are, so a send with sender=User never "
            "reaches the handler."
        )
    signal = Signal()
    with deferred(signal, fine, sender="billing"):  # a plain str sender is a sender like any
        signal.send(sender="billing", x=1)
        assert CALLS == [{"x": 1}]
        assert "deferred_signals.W005" not in [m.id for m in check_settings()]
    with deferred(post_save, fine, sender="testapp.Article"):  # resolved by the model signal
        assert "deferred_signals.W005" not in [m.id for m in check_settings()]


def test_a_single_problem_is_one_sentence() -> None:
    with pytest.raises(DeferredSignalConfigError) as raised:
        connect(Signal(), fine, defer=True, include_raws=True)
    assert str(raised.value).startswith(
        f"Deferred handler '{__name__}.fine' has an unknown option 'include_raws' "
        "(did you mean 'include_raw'?). Use one of:"
    )


def test_send_robust_names_the_users_handler() -> None:
    signal = Signal()
    with deferred(signal, on_save):
        ((receiver_, error),) = signal.send_robust(sender=None, instance="row")
    assert receiver_.__wrapped__ is on_save
    assert (receiver_.__name__, receiver_.__qualname__) == ("on_save", "on_save")
    assert receiver_.__module__ == __name__
    assert isinstance(error, DeferredSignalError) and "'creatd'" in str(error)


# --- 6. aliases: a renamed handler keeps serving its former names --------------------------


def test_aliases_get_tasks_that_run_the_renamed_handler() -> None:
    signal = Signal()
    with deferred(signal, fine, name="shop.new_name", aliases=["shop.old_name"]) as handler:
        assert registry.get("shop.old_name") is handler
        assert [h.name for h in registry.all_handlers()].count("shop.new_name") == 1
        old = current_app.tasks["shop.old_name"]
        body = {"v": 1, "signal": 0, "sender": None, "kwargs": {"x": 7}}
        old.apply(kwargs=body).get()
        assert CALLS == [{"x": 7}]
        assert old.max_retries == handler.task.max_retries  # the handler's options apply
    assert registry.get("shop.old_name") is None


def test_an_alias_serves_one_handler_only() -> None:
    signal = Signal()
    with deferred(signal, fine, name="shop.a", aliases=["shop.old"]):
        with pytest.raises(DuplicateHandlerError, match=r"'shop\.old', which deferred handler"):
            connect(signal, with_default, defer=True, name="shop.b", aliases=["shop.old"])
        with pytest.raises(DuplicateHandlerError, match="keeps as an alias"):
            connect(signal, with_default, defer=True, name="shop.old")
        with pytest.raises(DeferredSignalConfigError, match=r"alias 'shop\.c'"):
            connect(signal, with_default, defer=True, name="shop.c", aliases=["shop.c"])
    assert registry.get("shop.b") is None and registry.get("shop.c") is None


def test_aliases_need_defer() -> None:
    with pytest.raises(DeferredSignalError, match=r"'aliases'.*add defer=True"):
        connect(Signal(), fine, aliases=["shop.old"])
