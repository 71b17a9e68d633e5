"""The worker's fresh fetch (``deferred_signals.fetch``) against the ORM's ``get(pk=...)``.

Runs in both passes of ``make test``: SQLite (converters for decimals, dates, UUIDs) and
PostgreSQL. The fetch must give the instance the ORM gives, field for field and type for
type, run the very SQL ``get()`` runs, raise what it raises, and leave to the ORM every
model it does not compile.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import pytest
from django.db import connections, models
from django.test.utils import CaptureQueriesContext, isolate_apps

from deferred_signals import fetch as fetch_module
from deferred_signals.fetch import fetch
from tests.testapp.models import Article, Author, Color, Ticket

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
    plan = fetch_module._plans[(Author, "default", connections["default"])]
    assert not isinstance(plan, fetch_module._Plan)


def test_a_new_plan_once_the_models_fields_change() -> None:
    author = Author.objects.create(name="Ada")
    fetch(Author, "default", author.pk)
    key = (Author, "default", connections["default"])
    first = fetch_module._plans[key]
    assert isinstance(first, fetch_module._Plan)
    Author._meta._expire_cache()
    fetch(Author, "default", author.pk)
    second = fetch_module._plans[key]
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
