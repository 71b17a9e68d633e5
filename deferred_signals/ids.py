"""Random (version 4) UUIDs as strings, the ids of calls and of their Redis deliveries.

``celery.utils.uuid()`` builds a :class:`uuid.UUID` object for each id, only to turn it into
a string: about 4 µs where the same 16 random bytes formatted here take about 1.3 µs, paid
twice per call on the request path (the call's id, then the delivery tag of its message).
The result is what ``str(uuid.uuid4())`` returns: the same randomness (``os.urandom``), the
same version and variant bits, the same lowercase 8-4-4-4-12 form.

The random bytes are read from the kernel for 64 ids at a time, not 16 bytes per id: in a
request, between database round trips, each ``getrandom`` system call cost 4-6 µs, most of
an id's price. The values are the process's, shared by its threads and greenlets (one
list, taken from with ``list.pop()``, which hands each value out once), and tagged with the
pid that read them: a forked child, however it forked (``os.fork()``, or a C-level fork that
runs no at-fork hook, as uWSGI's workers by default), reads its own before its first id.
"""

from __future__ import annotations

import os

#: Clears the version nibble and the two variant bits; the next mask sets them.
_KEEP = 0xFFFFFFFF_FFFF_0FFF_3FFF_FFFFFFFFFFFF
#: Version 4 (random), variant RFC 4122 (binary 10).
_SET = 0x00000000_0000_4000_8000_000000000000
#: Ids drawn per read of ``os.urandom``.
BATCH = 64


class _Random:
    """The process's unused random values, one 128-bit int per id, and whose they are."""

    __slots__ = ("pid", "values")

    def __init__(self) -> None:
        self.pid = -1
        self.values: list[int] = []


_random = _Random()


def _refill() -> list[int]:
    data = os.urandom(16 * BATCH)
    values = [int.from_bytes(data[start : start + 16], "big") for start in range(0, len(data), 16)]
    # Another thread may refill at the same time: each list is new randomness, and each
    # value of either goes out once.
    _random.values, _random.pid = values, os.getpid()
    return values


def uuid4() -> str:
    """A new random UUID, as ``str(uuid.uuid4())`` gives it."""
    random = _random
    try:
        if random.pid != os.getpid():
            raise IndexError  # read by the parent: not ours
        bits = random.values.pop()
    except IndexError:
        bits = _refill().pop()
    value = "%032x" % ((bits & _KEEP) | _SET)
    return f"{value[:8]}-{value[8:12]}-{value[12:16]}-{value[16:20]}-{value[20:]}"
