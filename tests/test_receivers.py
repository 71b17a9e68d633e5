"""Unit layer: ``receiver``/``connect`` as a drop-in, registration, and send-time errors."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import pytest
from celery import current_app
from django.db.models.signals import post_save
from django.dispatch import Signal
from django.dispatch import receiver as django_receiver

from deferred_signals import (
    DeferredSignalConfigError,
    DeferredSignalError,
    DuplicateHandlerError,
    connect,
    receiver,
    registry,
)
from deferred_signals.models import DeadLetter, OutboxCall
from deferred_signals.registry import NAME_LENGTH
from tests.testapp import handlers
from tests.testapp.models import Article, Author


@contextmanager
def deferred(signal: Signal, func: Callable[..., Any], **kwargs: Any) -> Iterator[registry.Handler]:
    """Connect ``func`` as a deferred handler for the duration of a test."""
    connect(signal, func, defer=True, **kwargs)
    handler = registry.get(kwargs.get("name") or f"{func.__module__}.{func.__qualname__}")
    assert handler is not None
    try:
        yield handler
    finally:
        signal.disconnect(
            func, sender=kwargs.get("sender"), dispatch_uid=kwargs.get("dispatch_uid")
        )
        registry.unregister(handler.name)


def module_level_handler(sender: Any, **kwargs: Any) -> None:
    """A docstring Flower shows."""


def other_module_level_handler(sender: Any, **kwargs: Any) -> None:
    pass


class Indexer:
    ran: ClassVar[list[tuple[str, Any]]] = []

    def reindex(self, sender: Any, n: int, **kwargs: Any) -> None:
        self.ran.append((f"instance {id(self)}", n))

    @classmethod
    def on_any(cls, sender: Any, n: int, **kwargs: Any) -> None:
        cls.ran.append((cls.__name__, n))


# --- defer=False is Django's receiver -------------------------------------------------------


def test_without_defer_it_is_djangos_receiver() -> None:
    signal = Signal()
    calls: list[tuple[Any, dict[str, Any]]] = []

    def handler(sender: Any, **kwargs: Any) -> str:
        calls.append((sender, kwargs))
        return "result"

    decorated = receiver(signal, sender=Author, dispatch_uid="uid")(handler)
    assert decorated is handler
    assert signal.send(sender=Article) == []
    assert signal.send(sender=Author, x=1) == [(handler, "result")]
    assert calls == [(Author, {"signal": signal, "x": 1})]
    # dispatch_uid: connecting again under the same uid is a no-op, as in Django.
    receiver(signal, sender=Author, dispatch_uid="uid")(lambda **kw: None)
    assert len(signal.send(sender=Author)) == 1


def test_without_defer_receivers_are_weak_like_djangos() -> None:
    ours, theirs = Signal(), Signal()

    def make() -> Callable[..., None]:
        def closure(**kwargs: Any) -> None:
            pass

        return closure

    receiver(ours)(make())
    django_receiver(theirs)(make())
    gc.collect()
    assert ours.send(sender=None) == theirs.send(sender=None) == []

    kept = make()
    receiver(ours, weak=False)(make())
    receiver([ours, theirs])(kept)
    assert len(ours.send(sender=None)) == 2 and len(theirs.send(sender=None)) == 1


def test_deferred_only_options_without_defer_are_refused() -> None:
    with pytest.raises(DeferredSignalError, match="add defer=True"):
        receiver(Signal(), queue="crm")
    with pytest.raises(DeferredSignalError, match="'name'"):
        connect(Signal(), module_level_handler, name="x")
    signal = Signal()
    connect(signal, module_level_handler, sender=Author)
    assert signal.has_listeners(Author)


# --- defer=True --------------------------------------------------------------------------


def test_decorated_function_is_returned_unchanged_and_callable() -> None:
    assert handlers.article_saved.__name__ == "article_saved"
    assert receiver(Signal(), defer=True, name="tests.unchanged")(module_level_handler) is (
        module_level_handler
    )
    assert module_level_handler(sender=None) is None
    registry.unregister("tests.unchanged")


def test_one_task_per_handler_named_module_qualname() -> None:
    tasks = current_app.tasks
    task = tasks["tests.testapp.handlers.article_saved"]
    assert task.name == "tests.testapp.handlers.article_saved"
    assert task.__doc__ is None  # the handler has no docstring
    assert "tests.user_event" in tasks  # name= overrides
    with deferred(Signal(), module_level_handler) as handler:
        task = current_app.tasks[handler.name]
        assert handler.name == f"{__name__}.module_level_handler"
        assert task.__doc__ == "A docstring Flower shows."


def test_two_functions_under_one_name_fail_at_import_time() -> None:
    with (
        deferred(Signal(), module_level_handler, name="tests.same"),
        pytest.raises(DuplicateHandlerError, match=r"tests\.same"),
    ):
        connect(Signal(), other_module_level_handler, defer=True, name="tests.same")


def test_one_function_connected_to_several_senders_shares_its_handler() -> None:
    signal = Signal()
    with deferred(signal, module_level_handler, sender=Author) as first:
        connect(signal, module_level_handler, sender=Article, defer=True)
        assert registry.get(first.name) is first and first.signals == [signal]
        assert signal.has_listeners(Author) and signal.has_listeners(Article)
        with pytest.raises(DuplicateHandlerError, match="different options"):
            connect(signal, module_level_handler, sender=Article, defer=True, queue="other")
        signal.disconnect(module_level_handler, sender=Article)


def test_one_bound_method_connected_to_two_signals_shares_its_handler() -> None:
    saved, deleted = Signal(), Signal()
    indexer = Indexer()
    # Each attribute read makes a new bound-method object: the same receiver all the same.
    with deferred(saved, indexer.reindex, sender=Article) as handler:
        connect(deleted, indexer.reindex, sender=Article, defer=True)
        assert handler.name == f"{__name__}.Indexer.reindex"
        assert handler.signals == [saved, deleted] and deleted.has_listeners(Article)
        with pytest.raises(DuplicateHandlerError, match=r"Two deferred handlers.*Indexer\.reindex"):
            connect(deleted, Indexer().reindex, sender=Author, defer=True)  # another instance
        deleted.disconnect(indexer.reindex, sender=Article)


@pytest.mark.django_db(transaction=True)  # EAGER in these settings: runs at once
def test_bound_methods_and_classmethods_run_as_deferred_handlers() -> None:
    signal, indexer = Signal(), Indexer()
    Indexer.ran.clear()
    with (
        deferred(signal, indexer.reindex, name="tests.reindex"),
        deferred(signal, Indexer.on_any) as by_class,
    ):
        assert by_class.name == f"{__name__}.Indexer.on_any"
        signal.send(sender=None, n=1)
    assert sorted(Indexer.ran) == [("Indexer", 1), (f"instance {id(indexer)}", 1)]


def test_lambdas_and_local_functions_need_a_name() -> None:
    def local(**kwargs: Any) -> None:
        pass

    for func in (lambda **kw: None, local):
        with pytest.raises(DeferredSignalConfigError, match="a lambda or a function defined"):
            connect(Signal(), func, defer=True)
    # A partial is neither: the message says what it is.
    bound = functools.partial(module_level_handler)
    with pytest.raises(DeferredSignalConfigError, match=r"a functools\.partial .*name="):
        connect(Signal(), bound, defer=True)
    with deferred(Signal(), local, name="tests.local") as handler:
        assert handler.func is local


def test_bad_options_fail_at_import_time_naming_handler_and_option() -> None:
    with pytest.raises(DeferredSignalConfigError, match=r"module_level_handler.*'retries'"):
        connect(Signal(), module_level_handler, defer=True, retries=3)
    with pytest.raises(DeferredSignalConfigError, match=r"'instance'.*'fresh' or 'snapshot'"):
        connect(Signal(), module_level_handler, defer=True, instance="copy")
    with pytest.raises(DeferredSignalConfigError, match=r"not a django\.dispatch\.Signal"):
        connect("post_save", module_level_handler, defer=True)  # type: ignore[arg-type]
    with pytest.raises(DeferredSignalConfigError, match="must be callable"):
        connect(Signal(), "handler", defer=True)  # type: ignore[arg-type]
    with pytest.raises(DeferredSignalConfigError, match="using"):
        connect(Signal(), module_level_handler, defer=True, using=1)  # type: ignore[arg-type]
    assert registry.get(f"{__name__}.module_level_handler") is None


@pytest.mark.parametrize("defer", ["yes", "false", 1, None])
def test_defer_must_be_a_bool(defer: Any) -> None:
    where = rf"defer={defer!r} for {__name__}\.module_level_handler: "
    with pytest.raises(DeferredSignalConfigError, match=where + "defer must be True or False"):
        connect(Signal(), module_level_handler, defer=defer)
    with pytest.raises(TypeError, match=rf"defer={defer!r}: defer must be True or False"):
        receiver(Signal(), defer=defer)
    assert registry.get(f"{__name__}.module_level_handler") is None


def test_names_and_aliases_are_non_empty_strings_that_fit_the_tables() -> None:
    assert OutboxCall._meta.get_field("handler").max_length == NAME_LENGTH
    assert DeadLetter._meta.get_field("handler").max_length == NAME_LENGTH
    too_long = "x" * (NAME_LENGTH + 1)
    for kwargs, problem in [
        ({"name": ""}, "has name='': give a non-empty str"),
        ({"name": " "}, "has name=' ': give a non-empty str"),
        ({"name": 123}, "has name=123: give a non-empty str"),
        ({"name": too_long}, rf"has name='x+'\.\.\. \({NAME_LENGTH + 1} characters\): the outbox"),
        ({"aliases": [""]}, "has the alias '': give a non-empty str"),
        ({"aliases": [too_long]}, rf"has the alias 'x+'\.\.\. \({NAME_LENGTH + 1} characters\)"),
        ({"aliases": "shop.old"}, r"has aliases='shop\.old': give a list of former names, "),
        ({"include_raw": "no"}, "has include_raw='no': give True or False"),
    ]:
        with pytest.raises(DeferredSignalConfigError, match=problem):
            connect(Signal(), module_level_handler, defer=True, **kwargs)

    def long_named(**kwargs: Any) -> None:
        pass

    long_named.__qualname__ = "y" * NAME_LENGTH  # module.qualname: too long by the module's
    with pytest.raises(DeferredSignalConfigError, match=r"has the name '.*characters\)"):
        connect(Signal(), long_named, defer=True)
    with deferred(Signal(), long_named, name="z" * NAME_LENGTH) as handler:  # fits exactly
        assert handler.task.name == "z" * NAME_LENGTH
    assert registry.get(f"{__name__}.module_level_handler") is None


def test_django_disconnect_removes_the_deferred_proxy() -> None:
    signal = Signal()
    with deferred(signal, module_level_handler, sender=Author):
        assert signal.has_listeners(Author)
        assert signal.disconnect(module_level_handler, sender=Author) is True
        assert not signal.has_listeners(Author)


def test_connecting_twice_connects_once() -> None:
    signal = Signal()
    with deferred(signal, module_level_handler):
        connect(signal, module_level_handler, defer=True)
        assert len(signal.receivers) == 1


def test_deferred_connection_is_strong() -> None:
    signal = Signal()

    def make() -> Callable[..., None]:
        def closure(**kwargs: Any) -> None:
            pass

        return closure

    with deferred(signal, make(), name="tests.strong", weak=True):
        gc.collect()
        assert signal.has_listeners()


@pytest.mark.django_db
def test_raw_post_save_is_not_deferred_by_default(django_capture_on_commit_callbacks: Any) -> None:
    with django_capture_on_commit_callbacks() as callbacks:
        post_save.send(
            sender=Article, instance=Article(pk=1), created=True, raw=True, using="default"
        )
    assert callbacks == []


def test_a_deferred_handler_must_accept_kwargs() -> None:
    def no_kwargs(sender: Any, instance: Any) -> None:
        pass

    with pytest.raises(DeferredSignalConfigError, match=r"add \*\*kwargs"):
        connect(Signal(), no_kwargs, defer=True, name="tests.no_kwargs")
    assert registry.get("tests.no_kwargs") is None


def test_lazy_model_senders_with_apps_are_passed_to_django() -> None:
    from django.apps import apps

    signal = post_save
    calls: list[Any] = []

    def on_author(sender: Any, **kwargs: Any) -> None:
        calls.append(sender)

    receiver(signal, sender="testapp.Author", apps=apps, weak=False)(on_author)
    try:
        signal.send(sender=Author, instance=Author(name="x"), created=True)
    finally:
        signal.disconnect(on_author, sender=Author)
    assert calls == [Author]


def test_a_sender_with_a_strange_eq_is_fine() -> None:
    class Touchy:
        def __eq__(self, other: object) -> bool:
            raise RuntimeError("do not compare me")

        __hash__ = object.__hash__

    touchy = Touchy()
    signal = Signal()
    seen: list[Any] = []
    receiver(signal, sender=touchy, weak=False)(lambda sender, **kw: seen.append(sender))
    signal.send(sender=touchy)
    assert seen == [touchy]


def test_typos_without_defer_get_djangos_own_error() -> None:
    with pytest.raises(TypeError, match="weka"):
        receiver(Signal(), weka=True)(module_level_handler)


# --- the package's own models ---------------------------------------------------------------


@pytest.mark.django_db
def test_a_catch_all_handler_never_hears_of_the_packages_own_rows() -> None:
    """A deferred ``post_save`` handler with no sender would feed on its own dead letters
    (each failure saves one, whose save defers another call that fails...) and on every
    relay heartbeat and processed call id."""
    from django.utils import timezone

    from deferred_signals.models import DeadLetter, OutboxCall, ProcessedCall, RelayHeartbeat
    from deferred_signals.testing import capture_deferred

    def audit_every_save(sender: Any, **kwargs: Any) -> None:
        pass

    with deferred(post_save, audit_every_save, name="tests.audit_every_save"):
        with capture_deferred() as captured:
            DeadLetter.objects.create(call_id="c1", handler="h", body="{}", exception="E")
            OutboxCall.objects.create(
                id="c2", handler="h", body="{}", next_attempt_at=timezone.now()
            )
            RelayHeartbeat.objects.update_or_create(
                name="r", defaults={"last_loop_at": timezone.now()}
            )
            ProcessedCall.objects.create(call_id="c3", handler="h")
            Author.objects.create(name="heard")
        assert [call.sender for call in captured.calls] == [Author]
