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
``select_related``), a multi-table child (its pk is a relation), a compiled query whose
parameters are not the pk alone, more than one row. A plan is made again when the model's
fields change (``_meta`` expired) or on another connection object (each thread has its own).
"""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.db.models import Manager, Model
from django.db.models.query import MAX_GET_RESULTS

__all__ = ["fetch"]


class _Plan:
    """What a fetch of ``model`` on one connection runs and how it reads the row."""

    __slots__ = ("converters", "end", "fields", "init_list", "sql", "start")

    def __init__(
        self,
        fields: Any,
        sql: str,
        init_list: list[str],
        start: int,
        end: int,
        converters: list[tuple[int, tuple[list[Any], Any]]],
    ) -> None:
        #: ``model._meta.concrete_fields`` when compiled: a new tuple once ``_meta`` expires.
        self.fields = fields
        self.sql = sql
        self.init_list = init_list
        self.start = start
        self.end = end
        self.converters = converters


#: (model, alias, connection) -> its plan, or the fields tuple when the ORM must do it.
_plans: dict[tuple[type[Model], str, Any], _Plan | tuple[Any, ...]] = {}


def fetch(model: type[Model], db: str, pk: Any) -> Model:
    """``model._base_manager.db_manager(db).get(pk=pk)``: the same instance, the same errors."""
    connection = connections[db]
    key = (model, db, connection)
    plan = _plans.get(key)
    fields = model._meta.concrete_fields
    if plan is None or (plan.fields if type(plan) is _Plan else plan) is not fields:
        plan = _plans[key] = _compile(model, db, pk, connection) or fields
    if type(plan) is not _Plan:
        return model._base_manager.db_manager(db).get(pk=pk)
    param = _prepare(model, pk, connection)
    with connection.cursor() as cursor:
        cursor.execute(plan.sql, (param,))
        rows = cursor.fetchall()
    if len(rows) != 1:
        # None (DoesNotExist) or several (MultipleObjectsReturned): the ORM says it its way.
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
    sql, params = compiler.as_sql()
    # The pk must be the query's one parameter, prepared as _prepare() prepares it.
    if len(params) != 1 or params[0] != _prepare(model, pk, connection):
        return None
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
    return _Plan(
        model._meta.concrete_fields, sql, init_list, start, end, list(converters.items())
    )


def clear() -> None:
    """Forget every plan (tests that swap databases or models)."""
    _plans.clear()
