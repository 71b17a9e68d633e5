"""Signal arguments to JSON-safe data, keeping their Python types (``decoder.py`` goes back).

Plain JSON values (``str``, ``int``, ``float``, ``bool``, ``None``, lists, dicts with string
keys) travel as they are. Everything else travels as a tagged object ``{"$t": tag, ...}``.
Model instances and classes are found again through Django's app registry, other classes only
among modules the worker has already imported, and user types only through codecs registered
with :func:`register_codec`: decoding never imports a module named by a message.
"""

from __future__ import annotations

import base64
import datetime
import enum
import io
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.core.files import File
from django.db import models
from django.db.models.fields.files import FieldFile
from django.db.models.query import QuerySet
from django.utils.functional import Promise

from .exceptions import DeferredSignalConfigError

TAG = "$t"
#: How deeply an argument may nest once encoded (JSON containers, tagged forms included).
#: Deeper arguments are refused at send time and deeper messages at the worker, where a few
#: hundred levels would otherwise crash Celery's main process while it pickles them for the pool.
MAX_DEPTH = 100
#: kombu's JSON decoder turns an object with exactly these keys back into a Python value:
#: such dicts travel in the tagged form, like dicts that contain TAG.
KOMBU_KEYS = "__type__"
JSON = Any


class EncodeError(Exception):
    """Internal: ``value`` has a type with no codec. Callers add the handler and the path."""

    def __init__(self, value: object, hint: str = "") -> None:
        super().__init__(value)
        self.value = value
        self.hint = hint


class TooDeepError(EncodeError):
    """Internal: an argument nests deeper than :data:`MAX_DEPTH` once encoded."""


class CodecFailedError(EncodeError):
    """Internal: a registered codec's ``encode()`` raised; chained from its exception."""

    def __init__(self, value: object, codec: _Custom, error: Exception) -> None:
        name = codec.tag.removeprefix("x:")
        super().__init__(
            value,
            f"the encode() of codec {name!r} (registered for {codec.type.__qualname__}) "
            f"raised {error!r}; fix the codec, or send a value it can encode",
        )


@dataclass(frozen=True)
class _Custom:
    tag: str
    type: type
    encode: Callable[[Any], JSON]
    decode: Callable[[JSON], Any]


#: Sent by the encoder's fast path, exact types only (a subclass goes to the codecs).
_NATIVE_TYPES = (str, int, bool, float, type(None), list, dict, tuple, set, frozenset)
_custom_by_type: dict[type, _Custom] = {}
_custom_by_tag: dict[str, _Custom] = {}


def register_codec(
    type_: type,
    *,
    name: str,
    encode: Callable[[Any], JSON],
    decode: Callable[[JSON], Any],
) -> None:
    """Teach deferred_signals to send values of ``type_`` (and its subclasses).

    ``encode(value)`` returns JSON-safe data (it may contain any type this codec knows);
    ``decode(data)`` rebuilds the value on the worker. ``name`` identifies the codec in
    messages: keep it stable across deployments. Register at import time, e.g. in your
    ``AppConfig.ready()``, so that web processes and workers both know it.
    """
    if not isinstance(type_, type):
        raise TypeError(f"register_codec() needs a class, not {type_!r}.")
    if _native(type_):
        raise DeferredSignalConfigError(
            f"register_codec({type_.__qualname__}, name={name!r}) would never be used: "
            f"deferred_signals sends {type_.__qualname__} values itself, before it looks at "
            "registered codecs. Remove the call (the types sent natively are listed in the "
            "arguments reference)."
        )
    tag = f"x:{name}"
    existing = _custom_by_tag.get(tag)
    if existing is not None and existing.type is not type_:
        raise ValueError(
            f"A codec named {name!r} is already registered for {existing.type.__qualname__}."
        )
    previous = _custom_by_type.get(type_)
    if previous is not None and previous.tag != tag:
        # Replacing it silently would strand the messages in flight under the old name.
        raise ValueError(
            f"{type_.__qualname__} already has a codec, named "
            f"{previous.tag.removeprefix('x:')!r}; one type has one codec. To rename it, "
            f"call unregister_codec({type_.__qualname__}) first (messages still queued "
            "under the old name then no longer decode)."
        )
    codec = _Custom(tag, type_, encode, decode)
    _custom_by_type[type_] = codec
    _custom_by_tag[tag] = codec


def _native(type_: type) -> bool:
    """Does the encoder send values of ``type_`` without looking at registered codecs?"""
    # Exact types only, but for the families tested with isinstance() before the codecs.
    return (
        type_ in _NATIVE_TYPES
        or type_ in _SIMPLE_ENCODERS
        or issubclass(type_, (models.Model, QuerySet, type, bytearray, memoryview, Promise))
    )


def custom_codec(tag: str) -> _Custom | None:
    """The registered codec a message's tag names, if any (the decoder's only way to them)."""
    return _custom_by_tag.get(tag)


def unregister_codec(type_: type) -> None:
    """Forget the codec registered for ``type_`` (mostly for tests)."""
    codec = _custom_by_type.pop(type_, None)
    if codec is not None:
        _custom_by_tag.pop(codec.tag, None)


# --- encoding ----------------------------------------------------------------------------


class Encoder:
    """Encodes one call's arguments.

    ``fresh``: the worker re-fetches model instances by pk; otherwise it rebuilds them from
    their field values. ``fields``: send field values (always so when not ``fresh``; with
    ``fresh`` they are the fallback for ``on_missing="snapshot"``).
    """

    __slots__ = ("deleting", "fields", "fresh")

    def __init__(self, *, fresh: bool, fields: bool, deleting: bool = False) -> None:
        self.fresh = fresh
        self.fields = fields or not fresh
        #: pre/post_delete: a QuerySet ``origin`` (a bulk delete) is sent as its model and db.
        self.deleting = deleting

    def encode(self, value: Any, level: int = 1) -> JSON:
        # The hot path: no path strings are built here; locate() finds the path on error.
        # ``level`` is the JSON depth the value's encoding starts at; each container checks
        # its own depth with one comparison, so the wire depth never exceeds MAX_DEPTH.
        kind = type(value)
        if kind is str or kind is int or kind is bool or kind is float or value is None:
            return value
        if level > MAX_DEPTH:
            raise TooDeepError(value)
        if kind is list:
            return [self.encode(item, level + 1) for item in value]
        if kind is dict:
            if (
                TAG not in value
                and KOMBU_KEYS not in value
                and all(type(key) is str for key in value)
            ):
                return {key: self.encode(item, level + 1) for key, item in value.items()}
            if level + 2 > MAX_DEPTH:
                raise TooDeepError(value)
            return {
                TAG: "dict",
                "v": [
                    [self.encode(key, level + 3), self.encode(item, level + 3)]
                    for key, item in value.items()
                ],
            }
        simple = _SIMPLE_ENCODERS.get(kind)
        if simple is not None:
            if level + 1 > MAX_DEPTH:  # a timedelta's list
                raise TooDeepError(value)
            return {TAG: simple[0], "v": simple[1](value)}
        if level + 1 > MAX_DEPTH:  # every form below is an object around a value
            raise TooDeepError(value)
        if kind is tuple or kind is set or kind is frozenset:
            items = value if kind is tuple else _stable(value)
            tag = "tuple" if kind is tuple else kind.__name__
            return {TAG: tag, "v": [self.encode(item, level + 2) for item in items]}
        return self._encode_other(value, level)

    def _encode_other(self, value: Any, level: int) -> JSON:
        if isinstance(value, models.Model):
            if level + 2 > MAX_DEPTH:  # {"f": {name: {"$t": "field", ...}}}
                raise TooDeepError(value)
            return self._encode_instance(value, level)
        if isinstance(value, type):
            return _encode_class(value)
        if isinstance(value, QuerySet):
            if self.deleting:
                label = sys.intern(value.model._meta.label_lower)
                return {TAG: "deleted", "m": label, "db": value.db}
            raise EncodeError(value, "send a list of pks: list(qs.values_list('pk', flat=True))")
        if isinstance(value, (bytearray, memoryview)):
            return {TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, Promise):  # gettext_lazy() and friends: the text, as str
            return str(value)
        codec = _find_custom(type(value))
        if codec is not None:
            try:
                data = codec.encode(value)
            except Exception as error:
                raise CodecFailedError(value, codec, error) from error
            return {TAG: codec.tag, "v": self.encode(data, level + 1)}
        if isinstance(value, enum.Enum):
            if isinstance(value, (str, int)):
                # Django's TextChoices / IntegerChoices: the plain value compares equal.
                return self.encode(value.value, level)
            raise EncodeError(value, "send the member's .value, or register a codec")
        # Subclasses of the base types (SafeString, a datetime subclass...) travel as the base.
        for base in (str, int, float):
            if isinstance(value, base):
                return base(value)
        for simple, (tag, encode) in _SIMPLE_ENCODERS.items():
            if isinstance(value, simple):
                return {TAG: tag, "v": encode(value)}
        if isinstance(value, (File, io.IOBase)):
            # A codec would ship the bytes through the broker, or a path the worker lacks.
            raise EncodeError(
                value,
                "a file's content does not travel (an upload is gone once the request ends): "
                "save it to storage, e.g. name = default_storage.save(upload.name, upload), "
                "and send the name (or the instance whose FileField holds it)",
            )
        raise EncodeError(value, _container_hint(value))

    def _encode_instance(self, instance: models.Model, level: int) -> JSON:
        meta = instance._meta
        pk = instance.pk
        data: dict[str, JSON] = {
            TAG: "model",
            # label_lower builds a new str on each read: pending calls share one.
            "m": sys.intern(meta.label_lower),
            "pk": self.encode(pk, level + 1),
            "db": instance._state.db,
        }
        adding = instance._state.adding or pk is None
        if self.fresh and not adding:
            data["fresh"] = True
        if self.fields or adding:  # an unsaved row cannot be fetched: always a snapshot
            if instance._state.adding:
                data["adding"] = True
            deferred = instance.get_deferred_fields()
            fields = {}
            for field in meta.concrete_fields:
                if field.attname in deferred:
                    continue
                value = getattr(instance, field.attname)
                if isinstance(value, FieldFile):
                    value = value.name
                try:
                    fields[field.attname] = self.encode(value, level + 2)
                except CodecFailedError:
                    raise  # a bug to show, not a value to send as the field's text
                except EncodeError:
                    fields[field.attname] = _field_text(field, instance, value)
            data["f"] = fields
        return data


def _container_hint(value: object) -> str:
    """The fix for a container the codec does not send: the plain type it knows, rather than
    a codec for ``OrderedDict`` or one for ``generator``, which no worker can import."""
    if isinstance(value, Mapping):  # OrderedDict, defaultdict, Counter, UserDict...
        return "send a plain dict: dict(value) (the subclass does not travel)"
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return "send value._asdict() (a dict), or tuple(value)"
    for base in (list, tuple, set, frozenset):
        if isinstance(value, base):
            return f"send a plain {base.__name__}: {base.__name__}(value)"
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        # Generators, map(), zip(), dict views, range: read in the request or not data.
        return "send a list of its items: list(value)"
    return ""


def _field_text(field: Any, instance: models.Model, value: Any) -> JSON:
    """A value the codec does not know (ranges, geometries...): the field's own text form,
    as ``dumpdata`` writes it, if the field reads it back (``to_python``) as the same value."""
    try:
        text = field.value_to_string(instance)
        same = isinstance(text, str) and field.to_python(text) == value
    except Exception:
        same = False
    if not same:
        raise EncodeError(
            value,
            f"the field {field.name!r} does not read its value_to_string() back with "
            "to_python(); register a codec for its value's type",
        )
    return {TAG: "field", "v": text}


def _stable(items: set[Any] | frozenset[Any]) -> list[Any]:
    try:
        return sorted(items)
    except TypeError:
        return list(items)


def _encode_class(cls: type) -> JSON:
    meta = getattr(cls, "_meta", None)
    if isinstance(meta, models.options.Options) and issubclass(cls, models.Model):
        return {TAG: "modelclass", "v": sys.intern(meta.label)}
    if not allowed_class(cls):
        # A worker hands class values to handlers, which may call them: only classes the
        # project vouched for travel (the same rule the worker applies to what it receives).
        fix = (
            f"register_codec() refuses {cls.__qualname__}, a type sent natively: send the "
            "class's name instead"
            if _native(cls)
            else f"register_codec({cls.__qualname__}, name=..., encode=..., decode=...) "
            "vouches for the class (and its subclasses)"
        )
        raise EncodeError(
            cls, f"only model classes and classes with a registered codec travel as values; {fix}"
        )
    if "<locals>" in cls.__qualname__:
        raise EncodeError(cls, "a class defined inside a function cannot be found again")
    if cls.__module__ == "__main__" or lookup_class(cls.__module__, cls.__qualname__) is not cls:
        raise EncodeError(
            cls, "a worker cannot find this class by module and name: define it in a module"
        )
    return {TAG: "class", "v": f"{cls.__module__}:{cls.__qualname__}"}


def allowed_class(cls: type) -> bool:
    """A non-model class may travel as a value if a codec is registered for it or a base."""
    return _find_custom(cls) is not None


def _find_custom(kind: type) -> _Custom | None:
    if not _custom_by_type:
        return None
    for base in kind.__mro__:
        codec = _custom_by_type.get(base)
        if codec is not None:
            return codec
    return None


def _encode_timedelta(value: datetime.timedelta) -> list[int]:
    return [value.days, value.seconds, value.microseconds]


_SIMPLE_ENCODERS: dict[type, tuple[str, Callable[[Any], JSON]]] = {
    datetime.datetime: ("dt", datetime.datetime.isoformat),
    datetime.date: ("date", datetime.date.isoformat),
    datetime.time: ("time", datetime.time.isoformat),
    datetime.timedelta: ("td", _encode_timedelta),
    Decimal: ("dec", str),
    uuid.UUID: ("uuid", str),
    bytes: ("bytes", lambda value: base64.b64encode(value).decode("ascii")),
}


def lookup_class(module_name: str, qualname: str) -> type | None:
    """The class ``module:qualname`` among loaded modules, or None; never imports anything.

    Namespaces are read with ``vars()``, not ``getattr()``: a module's ``__getattr__`` may
    import a submodule, and a class's attributes may be descriptors that run code.
    """
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None or not part.isidentifier() or part.startswith("__"):
            return None
        obj = vars(obj).get(part)
    if not isinstance(obj, type) or (obj.__module__, obj.__qualname__) != (module_name, qualname):
        return None
    return obj
