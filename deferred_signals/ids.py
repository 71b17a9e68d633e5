"""Random (version 4) UUIDs as strings, the ids of calls and of their Redis deliveries.

``celery.utils.uuid()`` builds a :class:`uuid.UUID` object for each id, only to turn it into
a string: about 4 µs where the same 16 random bytes formatted here take about 1.3 µs, paid
twice per call on the request path (the call's id, then the delivery tag of its message).
The result is what ``str(uuid.uuid4())`` returns: the same randomness (``os.urandom``), the
same version and variant bits, the same lowercase 8-4-4-4-12 form.

The random bytes are read from the kernel for 64 ids at a time, not 16 bytes per id: in a
request, between database round trips, each ``getrandom`` system call cost 4-6 µs, most of
an id's price. Each thread draws from bytes of its own, and a forked child drops the bytes
it inherited (:func:`os.register_at_fork`), so no two threads or processes ever hand out
the same id.
"""

from __future__ import annotations

import os
import threading

#: Clears the version nibble and the two variant bits; the next mask sets them.
_KEEP = 0xFFFFFFFF_FFFF_0FFF_3FFF_FFFFFFFFFFFF
#: Version 4 (random), variant RFC 4122 (binary 10).
_SET = 0x00000000_0000_4000_8000_000000000000
#: Ids drawn per read of ``os.urandom``.
BATCH = 64


class _Random(threading.local):
    """The current thread's unused random values, one 128-bit int per id, last out first."""

    values: list[int]

    def __init__(self) -> None:
        self.values = []


_random = _Random()


def _forgotten() -> None:
    # The child's only thread is the one that forked: its values are the parent's too.
    _random.values = []


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forgotten)


def _refill() -> list[int]:
    data = os.urandom(16 * BATCH)
    values = _random.values = [
        int.from_bytes(data[start : start + 16], "big") for start in range(0, len(data), 16)
    ]
    return values


def uuid4() -> str:
    """A new random UUID, as ``str(uuid.uuid4())`` gives it."""
    values = _random.values or _refill()
    value = "%032x" % ((values.pop() & _KEEP) | _SET)
    return f"{value[:8]}-{value[8:12]}-{value[12:16]}-{value[16:20]}-{value[20:]}"
