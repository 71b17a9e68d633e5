"""Encoded arguments as compact, immutable tuples while their call waits for its commit.

A transaction may hold a hundred thousand pending calls. As dicts, each call's encoded
arguments cost a dict object and a key table per JSON object (about 180 bytes each), and
a copy of the same keys in every call. Frozen, a JSON object is one tuple, its values after
a tuple of its keys that all calls with the same keys share, and a JSON array is a tuple.
Frozen data cannot change, so calls may share it (one send's arguments among its
handlers, a model class's encoding among all sends); :func:`thaw` builds fresh dicts and
lists for each reader, so whatever a reader does to them reaches no other call.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model

from .codec import JSON, Encoder

__all__ = ["Frozen", "Object", "freeze", "sender", "thaw"]

#: A frozen JSON value: ``str``, ``int``, ``float``, ``bool``, ``None``, a tuple (an array)
#: or an :class:`Object`.
Frozen = Any

#: Key tuples are shared through this table, up to this many distinct ones: beyond it (dicts
#: with keys made from data), a key tuple is simply not shared.
MAX_SHARED_KEYS = 1024
_keys: dict[tuple[str, ...], tuple[str, ...]] = {}
#: Per model class, its encoding as a sender (constant: its label).
_model_senders: dict[type[Model], Frozen] = {}


class Object(tuple):  # type: ignore[type-arg]
    """A frozen JSON object: ``(keys, *values)``, ``keys`` a shared tuple of ``str``."""

    __slots__ = ()


def freeze(value: JSON) -> Frozen:
    """``value`` (an :class:`~deferred_signals.codec.Encoder`'s output) as tuples."""
    kind = type(value)
    if kind is dict:
        return _freeze_object(value)
    if kind is list:
        return _freeze_array(value)
    return value  # an encoder's output holds only JSON types: the rest is immutable


def thaw(frozen: Frozen) -> JSON:
    """``frozen`` as fresh JSON data: new dicts and lists, never shared with anything."""
    kind = type(frozen)
    if kind is Object:
        return _thaw_object(frozen)
    if kind is tuple:
        return _thaw_array(frozen)
    return frozen


# The helpers test each value's type inline rather than call themselves for every scalar:
# thaw runs for every call at commit, freeze for every send.


def _freeze_object(value: dict[str, JSON]) -> Object:
    keys = tuple(value)
    shared = _keys.get(keys)
    if shared is None:
        shared = keys
        if len(_keys) < MAX_SHARED_KEYS:
            _keys[keys] = keys
    items: list[Frozen] = [shared]
    for item in value.values():
        kind = type(item)
        if kind is dict:
            item = _freeze_object(item)
        elif kind is list:
            item = _freeze_array(item)
        items.append(item)
    return Object(items)


def _freeze_array(value: list[JSON]) -> tuple[Frozen, ...]:
    return tuple(
        [
            _freeze_object(item)
            if type(item) is dict
            else _freeze_array(item)
            if type(item) is list
            else item
            for item in value
        ]
    )


def _thaw_object(frozen: Object) -> dict[str, JSON]:
    values = iter(frozen)
    data = {}
    for key in next(values):
        value = next(values)
        kind = type(value)
        if kind is Object:
            value = _thaw_object(value)
        elif kind is tuple:
            value = _thaw_array(value)
        data[key] = value
    return data


def _thaw_array(frozen: tuple[Frozen, ...]) -> list[JSON]:
    return [
        _thaw_object(item)
        if type(item) is Object
        else _thaw_array(item)
        if type(item) is tuple
        else item
        for item in frozen
    ]


def sender(encoder: Encoder, value: Any) -> Frozen:
    """``value``, the signal's sender, encoded and frozen; a model class's only once."""
    if isinstance(value, type) and issubclass(value, Model):
        frozen = _model_senders.get(value)
        if frozen is None:
            frozen = _model_senders[value] = freeze(encoder.encode(value))
        return frozen
    return freeze(encoder.encode(value))
