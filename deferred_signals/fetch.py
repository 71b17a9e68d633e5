"""The worker's fresh fetch of a row, ``_base_manager.db_manager(db).get(pk=pk)``, compiled once.

The ORM builds, filters, compiles and iterates a new ``QuerySet`` for every ``get()``: on
loopback PostgreSQL about 130 µs of the 190 µs of CPU a fetch costs, more than everything
else a deferred task adds to a plain Celery task. For a model whose base manager is Django's
plain ``Manager`` and whose primary key is not a relation, the query ``get()`` runs (no
ordering, ``LIMIT 21``) is compiled once per model, database alias and connection; each
fetch then prepares the pk as the ``exact`` lookup prepares it, runs that SQL on a cursor of
the connection (execute wrappers, ``CaptureQueriesContext``, debug logging and tracing see
the query as for any ORM query), applies the compiler's converters and builds the instance
with ``Model.from_db``, as Django's ``ModelIterable`` does.

Anything else takes the ORM: a custom base manager (its queryset may filter, annotate or
``select_related``), a multi-table child (its pk is a relation), a composite pk, a query
whose shape depends on the value (a pk outside its integer column's range, which Django
answers with no query at all), more than one row. Plans live on the connection wrapper, so
they go with it (each thread or greenlet has its own), and are made again when the model's
fields change (``_meta`` expired).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as default
from typing import Any

from django.core.exceptions import EmptyResultSet, FullResultSet
from django.db import connections
from django.db.models import IntegerField, Manager, Model
from django.db.models.query import MAX_GET_RESULTS

__all__ = ["fetch"]

#: The connection wrapper's attribute that holds its plans: model -> its plan, or a
#: ``_Fallback`` when the ORM must fetch that model.
PLANS = "_deferred_signals_fetch_plans"

#: Bumped by :func:`clear`: every plan made before is made again.
_generation: list[int] = [0]


@dataclass(slots=True)
class _Plan:
    """What a fetch of a model on one connection runs and how it reads the row."""

    #: ``model._meta.concrete_fields`` when compiled: a new tuple once ``_meta`` expires.
    fields: Any
    sql: str
    init_list: list[str]
    start: int
    end: int
    converters: list[tuple[int, tuple[list[Any], Any]]]
    #: An integer pk's column range: outside it Django's ``exact`` runs no query.
    bounds: tuple[int | None, int | None] | None
    generation: int = default(default_factory=lambda: _generation[0])


class _Fallback:
    """The ORM fetches this model (as of these fields)."""

    __slots__ = ("fields", "generation")

    def __init__(self, fields: Any) -> None:
        self.fields = fields
        self.generation = _generation[0]


class _ValueDependent(Exception):
    """This pk's query is not the model's usual one: the ORM fetches it, no plan is kept."""


def fetch(model: type[Model], db: str, pk: Any) -> Model:
    """``model._base_manager.db_manager(db).get(pk=pk)``: the same instance, the same errors."""
    connection = connections[db]
    plans = connection.__dict__.get(PLANS)
    if plans is None:
        plans = connection.__dict__[PLANS] = {}
    plan = plans.get(model)
    fields = model._meta.concrete_fields
    if plan is None or plan.fields is not fields or plan.generation != _generation[0]:
        try:
            plan = plans[model] = _compile(model, db, pk, connection) or _Fallback(fields)
        except (_ValueDependent, EmptyResultSet, FullResultSet):
            return model._base_manager.db_manager(db).get(pk=pk)
    if type(plan) is not _Plan:
        return model._base_manager.db_manager(db).get(pk=pk)
    param = _prepare(model, pk, connection)
    bounds = plan.bounds
    if (
        bounds is not None
        and isinstance(param, int)
        and (
            (bounds[0] is not None and param < bounds[0])
            or (bounds[1] is not None and param > bounds[1])
        )
    ):
        return model._base_manager.db_manager(db).get(pk=pk)  # no query: DoesNotExist
    with connection.cursor() as cursor:
        cursor.execute(plan.sql, (param,))
        rows = cursor.fetchall()
    if not rows:
        missing: type[Exception] = model.DoesNotExist  # type: ignore[attr-defined]
        raise missing(f"{model._meta.object_name} matching query does not exist.")
    if len(rows) > 1:  # not for a primary key, but the ORM says it its way
        return model._base_manager.db_manager(db).get(pk=pk)
    row = rows[0]
    if plan.converters:
        row = list(row)
        for position, (converters, expression) in plan.converters:
            value = row[position]
            for converter in converters:
                value = converter(value, expression, connection)
            row[position] = value
    return model.from_db(db, plan.init_list, row[plan.start : plan.end])


def _prepare(model: type[Model], pk: Any, connection: Any) -> Any:
    """The pk as the ``exact`` lookup hands it to the database (``get_prep_value``, then
    ``get_db_prep_value(prepared=True)``)."""
    field = model._meta.pk
    assert field is not None
    return field.get_db_prep_value(field.get_prep_value(pk), connection, prepared=True)


def _compile(model: type[Model], db: str, pk: Any, connection: Any) -> _Plan | None:
    """The SQL and the row reader of ``get(pk=pk)``, or None when the ORM must do it."""
    manager = model._base_manager
    field = model._meta.pk
    if type(manager) is not Manager or field is None or field.is_relation:
        return None
    # What QuerySet.get() runs, step by step.
    clone = manager.db_manager(db).filter(pk=pk)
    if clone.query.can_filter() and not clone.query.distinct_fields:
        clone = clone.order_by()
    clone.query.set_limits(high=MAX_GET_RESULTS)
    compiler = clone.query.get_compiler(using=db, connection=connection)
    sql, params = compiler.as_sql()  # EmptyResultSet for a pk out of its column's range
    # The pk must be the query's one parameter, prepared as _prepare() prepares it.
    if len(params) != 1:
        # A composite pk always has more: the ORM for good. Any other shape is this value's.
        if getattr(model._meta, "pk_fields", [field]) != [field]:
            return None
        raise _ValueDependent
    if params[0] != _prepare(model, pk, connection):
        raise _ValueDependent
    klass_info = compiler.klass_info
    if (
        not klass_info
        or klass_info["model"] is not model
        or klass_info.get("related_klass_infos")
        or compiler.annotation_col_map
        or compiler.has_extra_select
    ):
        return None
    select = compiler.select
    select_fields = klass_info["select_fields"]
    start, end = select_fields[0], select_fields[-1] + 1
    init_list = [column[0].target.attname for column in select[start:end]]
    converters = compiler.get_converters([column[0] for column in select[: compiler.col_count]])
    bounds = None
    if isinstance(field, IntegerField):  # Django's IntegerFieldExact checks the range
        bounds = connection.ops.integer_field_range(field.get_internal_type())
    return _Plan(
        model._meta.concrete_fields, sql, init_list, start, end, list(converters.items()), bounds
    )


def clear() -> None:
    """Forget every plan, on every connection (tests that swap databases or models)."""
    _generation[0] += 1  # other threads' connections: made again on their next fetch
    for connection in connections.all(initialized_only=True):
        connection.__dict__.pop(PLANS, None)
