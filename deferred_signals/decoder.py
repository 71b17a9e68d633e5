"""Messages back to signal arguments, on the worker (or inline with ``EAGER``).

Only what this code base registered is looked up: models in Django's app registry, user
types among codecs registered with :func:`~deferred_signals.register_codec`, classes among
modules already imported. Anything unexpected is a :class:`MalformedMessageError`.
"""

from __future__ import annotations

import base64
import datetime
import sys
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from django.apps import apps
from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections, models

from .codec import JSON, TAG, allowed_class, custom_codec, lookup_class
from .exceptions import MalformedMessageError


class Decoder:
    """Decodes one call's arguments on the worker.

    Model instances come back as placeholders, listed in ``instances``: the caller looks the
    rows up (or rebuilds snapshots) only once the whole message has parsed, so a database
    error is never taken for a malformed message, and then calls :func:`resolve`.
    """

    def __init__(self) -> None:
        self.instances: list[_InstanceRef] = []

    def decode(self, data: JSON) -> Any:
        kind = type(data)
        if kind is str or kind is int or kind is bool or kind is float or data is None:
            return data
        if kind is list:
            return [self.decode(item) for item in data]
        if kind is not dict:
            raise MalformedMessageError(f"unexpected {kind.__name__} in arguments")
        tag = data.get(TAG)
        if tag is None:
            return {key: self.decode(item) for key, item in data.items()}
        try:
            decode = _TAGS.get(tag)
            if decode is not None:
                return decode(self, data["v"])
            if tag == "model":
                return self._instance_ref(data)
            if tag == "deleted":
                # The rows of a bulk delete are gone: an empty QuerySet of their model and db.
                return apps.get_model(data["m"])._base_manager.db_manager(self._db(data)).none()
            custom = custom_codec(tag)
            if custom is not None:
                return _decode_custom(custom, self.decode(data["v"]))
        except MalformedMessageError:
            raise
        except (
            KeyError, ValueError, TypeError, AttributeError, LookupError, ArithmeticError,
            InvalidOperation, ValidationError,
        ) as error:  # fmt: skip
            raise MalformedMessageError(f"bad {tag!r} value: {error!r}") from None
        raise MalformedMessageError(f"unknown type tag {tag!r}")

    @staticmethod
    def _db(data: dict[str, Any]) -> str:
        db = data["db"]
        if db is None:
            return DEFAULT_DB_ALIAS
        if not isinstance(db, str) or db not in connections.settings:
            raise MalformedMessageError(f"unknown database alias {db!r}")
        return db

    def _instance_ref(self, data: dict[str, Any]) -> _InstanceRef:
        model = apps.get_model(data["m"])
        db = self._db(data)
        fields = data.get("f")
        if fields is not None:
            if type(fields) is not dict:
                raise MalformedMessageError("instance fields must be an object")
            fields = {
                field.attname: self._field_value(field, fields[field.attname])
                for field in model._meta.concrete_fields
                if field.attname in fields
            }
        pk = self.decode(data["pk"])
        fresh = data.get("fresh") is True
        if pk is None:
            if fresh:  # only a saved row is sent fresh, and a saved row has a pk
                raise MalformedMessageError(f"a fresh {model._meta.label} with no pk")
        elif isinstance(pk, (list, dict, set, frozenset)):
            raise MalformedMessageError(f"a primary key cannot be a {type(pk).__name__}")
        else:
            pk = _primary_key(model, pk)
        if fields is not None:
            _check_snapshot_pk(model, pk, fields)
        ref = _InstanceRef(model, pk, db, fields, fresh)
        if ref.fields is None and not ref.fresh:
            raise MalformedMessageError("instance has neither field values nor fresh=true")
        # As sent: an unsaved instance stays unsaved (adding, and no database yet).
        ref.adding = data.get("adding") is True
        ref.sent_db = data["db"]
        self.instances.append(ref)
        return ref

    def _field_value(self, field: Any, data: JSON) -> Any:
        if type(data) is dict and data.get(TAG) == "field":
            return field.to_python(data["v"])
        return self.decode(data)


def _primary_key(model: type[models.Model], pk: Any) -> Any:
    """``pk`` as the model's primary key field reads it; a value it refuses is forged."""
    try:
        return model._meta.pk.to_python(pk)
    except (ValidationError, TypeError, ValueError) as error:
        raise MalformedMessageError(
            f"{pk!r} is not a primary key of {model._meta.label} ({error})"
        ) from None


def _check_snapshot_pk(model: type[models.Model], pk: Any, fields: dict[str, Any]) -> None:
    """A snapshot's fields hold its primary key, the one its ``pk`` says: the encoder always
    sends both, and without this a forged message would run the handler on an instance with
    no pk, or with another row's."""
    pk_fields = model._meta.pk_fields  # several for a composite primary key
    for field in pk_fields:
        if field.attname not in fields:
            raise MalformedMessageError(
                f"a {model._meta.label} snapshot without its primary key field {field.attname!r}"
            )
    sent = (
        fields[pk_fields[0].attname]
        if len(pk_fields) == 1
        else tuple(fields[field.attname] for field in pk_fields)
    )
    if sent is not None:  # None: an unsaved instance, whose "pk" is None too
        sent = _primary_key(model, sent)
    if sent != pk:
        raise MalformedMessageError(
            f"a {model._meta.label} snapshot with pk {pk!r} whose fields hold pk {sent!r}"
        )


class _InstanceRef:
    """Placeholder for a model instance until :func:`resolve` swaps in the real one."""

    __slots__ = ("adding", "db", "fields", "fresh", "model", "pk", "resolved", "sent_db")

    def __init__(
        self,
        model: type[models.Model],
        pk: Any,
        db: str,
        fields: dict[str, Any] | None,
        fresh: bool,
    ) -> None:
        self.model = model
        self.pk = pk
        self.db = db
        self.fields = fields
        self.fresh = fresh
        self.resolved: models.Model | None = None
        self.adding = False
        self.sent_db: str | None = db

    def __hash__(self) -> int:
        return hash((self.model, self.pk))


def snapshot_instance(ref: _InstanceRef) -> models.Model:
    """The instance as it was when the signal was sent, rebuilt from its field values."""
    assert ref.fields is not None
    meta = ref.model._meta
    names = [f.attname for f in meta.concrete_fields]
    values = [ref.fields.get(name, models.DEFERRED) for name in names]
    instance = ref.model.from_db(ref.db, names, values)
    instance._state.adding = ref.adding
    instance._state.db = ref.sent_db
    return instance


def resolve(value: Any) -> Any:
    """Replace every decoded instance placeholder in ``value`` by its resolved instance."""
    if isinstance(value, _InstanceRef):
        assert value.resolved is not None
        return value.resolved
    kind = type(value)
    if kind is list:
        return [resolve(item) for item in value]
    if kind is tuple:
        return tuple(resolve(item) for item in value)
    if kind is dict:
        return {resolve(key): resolve(item) for key, item in value.items()}
    if kind is set or kind is frozenset:
        return kind(resolve(item) for item in value)
    return value


def _find_class(value: str) -> type:
    module_name, _, qualname = value.partition(":")
    if module_name not in sys.modules:
        # Never import what a message names: only modules the worker already loaded count.
        raise MalformedMessageError(f"class {value!r}: module {module_name!r} is not loaded")
    found = lookup_class(module_name, qualname)
    if found is None:
        raise MalformedMessageError(f"{value!r} is not a class of a loaded module")
    if not allowed_class(found):
        # Model classes travel as "modelclass"; any other class needs a registered codec.
        raise MalformedMessageError(f"class {value!r} has no registered codec")
    return found


def _decode_dict(decoder: Decoder, items: list[list[Any]]) -> dict[Any, Any]:
    return {decoder.decode(key): decoder.decode(item) for key, item in items}


def _decode_list(kind: Callable[[Any], Any]) -> Callable[[Decoder, list[Any]], Any]:
    def decode(decoder: Decoder, items: list[Any]) -> Any:
        if type(items) is not list:
            raise TypeError("expected a list")
        return kind(decoder.decode(item) for item in items)

    return decode


def _decode_string(parse: Callable[[str], Any]) -> Callable[[Decoder, str], Any]:
    def decode(decoder: Decoder, value: str) -> Any:
        if type(value) is not str:
            raise TypeError("expected a string")
        return parse(value)

    return decode


def _decode_timedelta(decoder: Decoder, value: list[int]) -> datetime.timedelta:
    days, seconds, microseconds = value
    return datetime.timedelta(days=days, seconds=seconds, microseconds=microseconds)


_TAGS: dict[str, Callable[[Decoder, Any], Any]] = {
    "dict": _decode_dict,
    "tuple": _decode_list(tuple),
    "set": _decode_list(set),
    "frozenset": _decode_list(frozenset),
    "dt": _decode_string(datetime.datetime.fromisoformat),
    "date": _decode_string(datetime.date.fromisoformat),
    "time": _decode_string(datetime.time.fromisoformat),
    "td": _decode_timedelta,
    "dec": _decode_string(Decimal),
    "uuid": _decode_string(uuid.UUID),
    "bytes": _decode_string(lambda value: base64.b64decode(value, validate=True)),
    "modelclass": _decode_string(apps.get_model),
    "class": _decode_string(_find_class),
}


def _decode_custom(custom: Any, data: Any) -> Any:
    """A registered codec's ``decode()``: a database outage is retried like the handler's own
    (``db_retry_window``); anything else it raises means it cannot read this message."""
    try:
        return custom.decode(data)
    except (OperationalError, InterfaceError):
        raise
    except Exception as error:
        raise MalformedMessageError(f"codec {custom.tag!r} could not decode: {error!r}") from None
