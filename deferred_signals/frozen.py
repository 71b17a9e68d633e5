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
        keys = tuple(value)
        shared = _keys.get(keys)
        if shared is None:
            shared = keys
            if len(_keys) < MAX_SHARED_KEYS:
                _keys[keys] = keys
        return Object((shared, *map(freeze, value.values())))
    if kind is list:
        return tuple(map(freeze, value))
    return value  # an encoder's output holds only JSON types: the rest is immutable


def thaw(frozen: Frozen) -> JSON:
    """``frozen`` as fresh JSON data: new dicts and lists, never shared with anything."""
    kind = type(frozen)
    if kind is Object:
        return dict(zip(frozen[0], map(thaw, frozen[1:]), strict=True))
    if kind is tuple:
        return list(map(thaw, frozen))
    return frozen


def sender(encoder: Encoder, value: Any) -> Frozen:
    """``value``, the signal's sender, encoded and frozen; a model class's only once."""
    if isinstance(value, type) and issubclass(value, Model):
        frozen = _model_senders.get(value)
        if frozen is None:
            frozen = _model_senders[value] = freeze(encoder.encode(value))
        return frozen
    return freeze(encoder.encode(value))
