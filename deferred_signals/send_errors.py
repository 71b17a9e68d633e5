"""The errors a send raises, at send time, for a call a worker could not run.

Each names the deferred handler and the offending argument (its path inside the argument,
for a value nested in a container or a model's field) and says how to fix it: a handler
whose parameters do not take what the signal sends, an argument with no codec, an argument
nested deeper than a worker accepts.
"""

from __future__ import annotations

import inspect
from typing import Any

from django.db import models
from django.db.models.query import QuerySet

from .codec import MAX_DEPTH, EncodeError, Encoder, TooDeepError
from .exceptions import DeferredSignalError
from .registry import Handler


def check_signature(handler: Handler, names: frozenset[str]) -> None:
    """Refuse in the request a call the worker could only fail with a ``TypeError``.

    The worker calls ``handler(signal=..., sender=..., **kwargs)``, every argument by keyword.
    """
    try:
        parameters = inspect.signature(handler.func).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): let it be
        return
    sent = names | {"signal", "sender"}
    missing, positional, accepted = [], [], set()
    takes_any = False
    for parameter in parameters:
        if parameter.kind is parameter.VAR_KEYWORD:
            takes_any = True
        elif parameter.kind is parameter.POSITIONAL_ONLY:
            if parameter.default is parameter.empty:
                positional.append(parameter.name)
        elif parameter.kind is not parameter.VAR_POSITIONAL:
            accepted.add(parameter.name)
            if parameter.default is parameter.empty and parameter.name not in sent:
                missing.append(parameter.name)
    unexpected = [] if takes_any else sorted(sent - accepted)
    if not (missing or positional or unexpected):
        return
    where = f"Deferred handler {handler.name!r}"
    sends = f"the signal sends {', '.join(sorted(sent))}"
    problems = [
        *(
            f"{where} requires parameter {name!r}, which this signal does not send "
            f"({sends}). Fix: rename the parameter to one of those, or give it a default."
            for name in missing
        ),
        *(
            f"{where} takes {name!r} as positional-only, but the worker passes every "
            "argument by keyword. Fix: remove the '/' from its parameters."
            for name in positional
        ),
        *(
            f"{where} does not accept the keyword argument {name!r} ({sends}). "
            "Fix: add **kwargs to its parameters."
            for name in unexpected
        ),
    ]
    raise DeferredSignalError(" ".join(problems))


def too_deep_error(
    handler: Handler, encoder: Encoder, arguments: dict[str, Any]
) -> DeferredSignalError:
    # locate() would recurse as deep as the argument: encode each one again to find it.
    name = "an argument"
    for key, value in arguments.items():
        try:
            encoder.encode(value)
        except TooDeepError:
            name = key
            break
        except EncodeError:
            pass
    return DeferredSignalError(
        f"Deferred handler {handler.name!r} cannot receive argument {name!r}: it nests "
        f"deeper than {MAX_DEPTH} levels (the depth a worker accepts, counted in JSON "
        "containers once encoded). Fix: send a flatter value, or ids to look the data up."
    )


def encode_error(
    handler: Handler, error: EncodeError, arguments: dict[str, Any]
) -> DeferredSignalError:
    path = next(
        (found for name, value in arguments.items() if (found := locate(value, error.value, name))),
        # Not among the arguments: a registered codec's encode() returned it.
        "an argument (inside a registered codec's output)",
    )
    kind = type(error.value)
    # repr() of a QuerySet would run a query; of anything else, keep it short.
    if isinstance(error.value, QuerySet):
        shown = f"a QuerySet of {error.value.model._meta.label}"
    else:
        shown = f"{error.value!r:.80}"
    hint = error.hint or (
        "send a JSON-friendly value instead (for a model, the instance or its pk), or teach "
        f"deferred_signals the type: register_codec({kind.__qualname__}, name=..., "
        "encode=..., decode=...)"
    )
    return DeferredSignalError(
        f"Deferred handler {handler.name!r} cannot receive argument {path!r}: "
        f"{kind.__module__}.{kind.__qualname__} ({shown}) cannot be sent to a "
        f"worker. Fix: {hint}."
    )


def locate(value: Any, target: object, path: str) -> str | None:
    """The path from ``value`` to the object ``target`` inside it (for error messages)."""
    if value is target:
        return path
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            children += [(f"{path}<key {key!r}>", key), (f"{path}[{key!r}]", item)]
    elif isinstance(value, (list, tuple)):
        children = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, (set, frozenset)):
        children = [(f"{path}<item>", item) for item in value]
    elif isinstance(value, models.Model):
        children = [
            (f"{path}.{f.attname}", value.__dict__.get(f.attname))
            for f in value._meta.concrete_fields
        ]
    for child_path, child in children:
        found = locate(child, target, child_path)
        if found is not None:
            return found
    return None
