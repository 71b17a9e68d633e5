"""The worker's fresh fetch (``deferred_signals.fetch``) against the ORM's ``get(pk=...)``.

Runs in both passes of ``make test``: SQLite (converters for decimals, dates, UUIDs) and
PostgreSQL. The fetch must give the instance the ORM gives, field for field and type for
type, run the very SQL ``get()`` runs, raise what it raises, and leave to the ORM every
model it does not compile.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import gc
import threading
import time
import uuid
import weakref
from typing import Any

import pytest
from django.db import connection, connections, models
from django.db.models.functions import Lower
from django.test.utils import CaptureQueriesContext, isolate_apps

from deferred_signals import fetch as fetch_module
from deferred_signals.fetch import fetch
from tests.testapp.models import Article, Author, Color, ColorField, Ticket

pytestmark = pytest.mark.django_db(databases=["default", "other"])


def orm_get(model: type[models.Model], db: str, pk: Any) -> models.Model:
    return model._base_manager.db_manager(db).get(pk=pk)


def assert_same_instance(ours: models.Model, orm: models.Model) -> None:
    assert type(ours) is type(orm)
    for field in type(orm)._meta.concrete_fields:
        mine, theirs = getattr(ours, field.attname), getattr(orm, field.attname)
        assert mine == theirs, field.attname
        assert type(mine) is type(theirs), field.attname
    assert ours._state.db == orm._state.db
    assert ours._state.adding is orm._state.adding is False
    assert ours.get_deferred_fields() == orm.get_deferred_fields() == set()


def plan_of(model: type[models.Model], db: str = "default") -> Any:
    return connections[db].__dict__[fetch_module.PLANS][model]


@pytest.fixture(autouse=True)
def no_plans() -> None:
    fetch_module.clear()


def test_every_field_type_comes_back_as_the_orm_gives_it() -> None:
    author = Author.objects.create(name="Ada")
    article = Article.objects.create(
        title="Converters",
        author=author,
        price=decimal.Decimal("12.50"),
        published=datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.timezone.utc),
        day=datetime.date(2026, 11, 30),
        duration=datetime.timedelta(minutes=90),
        data={"nested": [1, 2, {"x": None}]},
        attachment="files/a.txt",
        blob=b"\x00\xffbytes",
    )
    ticket = Ticket.objects.create(subject="uuid pk", color=Color(1, 2, 3))
    for model, pk in ((Article, article.pk), (Ticket, ticket.pk), (Author, author.pk)):
        for _ in range(2):  # compiled on the first, from the plan on the second
            assert_same_instance(fetch(model, "default", pk), orm_get(model, "default", pk))
    fetched = fetch(Ticket, "default", str(ticket.pk))  # a pk as a message may carry it
    assert fetched.color == Color(1, 2, 3)
    assert fetched.pk == ticket.pk and isinstance(fetched.pk, uuid.UUID)
    assert bytes(fetch(Article, "default", article.pk).blob) == b"\x00\xffbytes"


def test_it_runs_the_sql_get_runs_once_per_fetch() -> None:
    author = Author.objects.create(name="Ada")
    connection = connections["default"]
    with CaptureQueriesContext(connection) as orm:
        orm_get(Author, "default", author.pk)
    for _ in range(2):
        with CaptureQueriesContext(connection) as ours:
            fetch(Author, "default", author.pk)
        assert [query["sql"] for query in ours] == [query["sql"] for query in orm]
    assert "LIMIT 21" in orm[0]["sql"]


def test_another_database_is_read_on_its_own_connection() -> None:
    author = Author.objects.using("other").create(name="Elsewhere")
    fetched = fetch(Author, "other", author.pk)
    assert fetched._state.db == "other"
    assert fetched.name == "Elsewhere"
    assert not Author.objects.using("default").filter(pk=author.pk).exists()
    with pytest.raises(Author.DoesNotExist):
        fetch(Author, "default", author.pk)


def test_a_missing_row_raises_what_the_orm_raises() -> None:
    Author.objects.create(name="warm")  # a plan exists before the miss
    fetch(Author, "default", Author.objects.get().pk)
    with pytest.raises(Author.DoesNotExist) as ours:
        fetch(Author, "default", 10**9)
    with pytest.raises(Author.DoesNotExist) as orm:
        orm_get(Author, "default", 10**9)
    assert str(ours.value) == str(orm.value)
    with pytest.raises(Ticket.DoesNotExist):
        fetch(Ticket, "default", uuid.uuid4())  # the first fetch of a model misses too
    with (
        CaptureQueriesContext(connections["default"]) as queries,
        pytest.raises(Author.DoesNotExist),
    ):
        fetch(Author, "default", 10**9)
    assert len(queries) == 1  # the miss is the query's answer, not asked again


def test_a_pk_out_of_its_columns_range_is_a_miss_as_in_the_orm() -> None:
    """Django's exact lookup on an integer field runs no query for a value out of the
    column's range (EmptyResultSet): no row. Before a plan exists and after."""
    huge = 2**63
    with pytest.raises(Author.DoesNotExist):
        orm_get(Author, "default", huge)
    with pytest.raises(Author.DoesNotExist):
        fetch(Author, "default", huge)  # the first fetch of the model: no plan kept
    assert Author not in connections["default"].__dict__.get(fetch_module.PLANS, {})
    author = Author.objects.create(name="Ada")
    assert fetch(Author, "default", author.pk) == author
    for pk in (huge, -(2**63) - 1):
        with pytest.raises(Author.DoesNotExist):
            fetch(Author, "default", pk)  # the driver would refuse to bind it
    assert isinstance(plan_of(Author), fetch_module._Plan)


def test_a_bad_pk_fails_as_in_the_orm() -> None:
    author = Author.objects.create(name="Ada")
    fetch(Author, "default", author.pk)
    with pytest.raises(ValueError) as ours:
        fetch(Author, "default", "not a number")
    with pytest.raises(ValueError) as orm:
        orm_get(Author, "default", "not a number")
    assert str(ours.value) == str(orm.value)


def test_a_custom_base_manager_is_left_to_the_orm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its queryset may filter (soft deletes), annotate or select_related: the ORM runs it."""

    class Hiding(models.Manager["Author"]):
        def get_queryset(self) -> models.QuerySet[Author]:
            return super().get_queryset().exclude(name__startswith="hidden")

    manager = Hiding()
    manager.model = Author
    manager.name = "hiding"
    hidden = Author.objects.create(name="hidden one")
    monkeypatch.setitem(Author._meta.__dict__, "base_manager", manager)
    with pytest.raises(Author.DoesNotExist):
        fetch(Author, "default", hidden.pk)
    plan = plan_of(Author)
    assert not isinstance(plan, fetch_module._Plan)


def test_a_new_plan_once_the_models_fields_change() -> None:
    author = Author.objects.create(name="Ada")
    fetch(Author, "default", author.pk)
    first = plan_of(Author)
    assert isinstance(first, fetch_module._Plan)
    Author._meta._expire_cache()
    fetch(Author, "default", author.pk)
    second = plan_of(Author)
    assert isinstance(second, fetch_module._Plan) and second is not first


@isolate_apps("tests.testapp")
def test_a_multi_table_child_is_left_to_the_orm() -> None:
    class Place(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

    class Restaurant(Place):
        serves = models.BooleanField(default=True)

        class Meta:
            app_label = "testapp"

    connection = connections["default"]
    assert Restaurant._meta.pk is not None and Restaurant._meta.pk.is_relation
    assert fetch_module._compile(Restaurant, "default", 1, connection) is None
    # Its parent is an ordinary model: compiled (nothing runs until a fetch).
    assert isinstance(fetch_module._compile(Place, "default", 1, connection), fetch_module._Plan)


@isolate_apps("tests.testapp")
@pytest.mark.django_db(transaction=True)
def test_model_shapes_agree_with_the_orm() -> None:
    """Proxy, generated and db_default fields, non-integer pks (char, decimal, a custom
    field), a composite pk and a custom base manager: what the ORM gives, or the ORM."""

    class Plain(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

    class Proxy(Plain):
        class Meta:
            proxy = True
            app_label = "testapp"

    class Named(models.Model):
        code = models.CharField(max_length=10, primary_key=True)
        price = models.DecimalField(max_digits=6, decimal_places=2)
        lowered = models.GeneratedField(
            expression=Lower("code"), output_field=models.CharField(max_length=10), db_persist=True
        )
        defaulted = models.IntegerField(db_default=7)
        color = ColorField(null=True)

        class Meta:
            app_label = "testapp"

    class ByDecimal(models.Model):
        id = models.DecimalField(max_digits=6, decimal_places=2, primary_key=True)

        class Meta:
            app_label = "testapp"

    class ByColor(models.Model):
        id = ColorField(primary_key=True)

        class Meta:
            app_label = "testapp"

    class Pair(models.Model):
        pk = models.CompositePrimaryKey("a", "b")
        a = models.IntegerField()
        b = models.CharField(max_length=5)

        class Meta:
            app_label = "testapp"

    class Named_manager(models.Manager["Any"]):
        pass

    class CustomBase(models.Model):
        name = models.CharField(max_length=10)
        objects = Named_manager()

        class Meta:
            app_label = "testapp"
            base_manager_name = "objects"

    created = [Plain, Named, ByDecimal, ByColor, Pair, CustomBase]
    with connection.schema_editor() as editor:
        for model in created:
            editor.create_model(model)
    try:
        plain = Plain.objects.create(name="x")
        Named.objects.create(code="ABC", price=decimal.Decimal("1.50"), color=Color(1, 2, 3))
        ByDecimal.objects.create(id=decimal.Decimal("3.10"))
        ByColor.objects.create(id=Color(4, 5, 6))
        Pair.objects.create(a=1, b="x")
        custom = CustomBase.objects.create(name="c")
        cases = [
            (Plain, plain.pk), (Proxy, plain.pk), (Named, "ABC"), (Named, "abc"),
            (ByDecimal, "3.1"), (ByDecimal, decimal.Decimal("3.10")), (ByColor, "4,5,6"),
            (Pair, [1, "x"]), (Pair, (1, "x")), (Pair, [1, "y"]), (CustomBase, custom.pk),
        ]  # fmt: skip
        for _ in range(2):  # compiled, then from the plan
            for model, pk in cases:
                ours = outcome(fetch, model, "default", pk)
                assert ours == outcome(orm_get, model, "default", pk), (model.__name__, pk)
        assert isinstance(plan_of(Proxy), fetch_module._Plan)
        assert isinstance(plan_of(Named), fetch_module._Plan)
        assert not isinstance(plan_of(Pair), fetch_module._Plan)
        assert not isinstance(plan_of(CustomBase), fetch_module._Plan)
    finally:
        with connection.schema_editor() as editor:
            for model in created:
                editor.delete_model(model)


def outcome(function: Any, *args: Any) -> Any:
    """What ``function(*args)`` gave: the instance's class, fields and state, or its error."""
    try:
        found = function(*args)
    except Exception as error:
        return ("raised", type(error).__name__, str(error))
    return (
        type(found).__name__,
        [
            (field.attname, getattr(found, field.attname), type(getattr(found, field.attname)))
            for field in type(found)._meta.concrete_fields
        ],
        found._state.db,
        found.get_deferred_fields(),
    )


def _in_threads(count: int, work: Any) -> list[weakref.ref[Any]]:
    """Run ``work`` in ``count`` short threads, one after the other (as gevent greenlets or
    a server's request threads would); weak references to each thread's connection."""
    refs: list[weakref.ref[Any]] = []

    def run() -> None:
        refs.append(weakref.ref(connections["default"]))
        with contextlib.suppress(Author.DoesNotExist):
            work()

    for _ in range(count):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    gc.collect()
    return refs


@pytest.mark.django_db(transaction=True)
def test_plans_go_with_their_threads_connection() -> None:
    """A plan must not keep a finished thread's connection (and its database session)."""
    assert [ref() for ref in _in_threads(3, lambda: orm_get(Author, "default", 10**9))] == [
        None
    ] * 3
    assert [ref() for ref in _in_threads(5, lambda: fetch(Author, "default", 10**9))] == [None] * 5


@pytest.mark.django_db(transaction=True)
def test_finished_threads_leave_no_database_session_open() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("counts PostgreSQL backends")

    def backends(expected: int | None = None) -> int:
        for _ in range(50):  # a backend leaves pg_stat_activity a moment after its client
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                )
                count = cursor.fetchone()[0]
            if expected is None or count == expected:
                break
            time.sleep(0.05)
        return count

    start = backends()
    _in_threads(5, lambda: fetch(Author, "default", 10**9))
    assert backends(start) == start


@pytest.mark.django_db(transaction=True)
def test_a_reconnect_debug_logging_and_execute_wrappers_see_the_query(settings: Any) -> None:
    author = Author.objects.create(name="Ada")
    fetch(Author, "default", author.pk)
    connection.close()
    settings.DEBUG = True
    connection.queries_log.clear()
    assert fetch(Author, "default", author.pk).name == "Ada"  # reconnects, same wrapper
    assert len(connection.queries) == 1 and str(author.pk) in connection.queries[0]["sql"]
    seen = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        fetch(Author, "default", author.pk)
    assert len(seen) == 1
