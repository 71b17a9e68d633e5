"""The ids of calls and deliveries: random version-4 UUIDs, in their usual string form."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from deferred_signals.ids import uuid4


def test_ids_are_version_4_uuids_in_canonical_form() -> None:
    for _ in range(2000):
        value = uuid4()
        parsed = uuid.UUID(value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value  # lowercase, 8-4-4-4-12


def test_ids_do_not_repeat_and_use_every_random_bit() -> None:
    values = [uuid.UUID(uuid4()).int for _ in range(5000)]
    assert len(set(values)) == len(values)
    # Each of the 122 random bits is set in some ids and clear in others.
    fixed = (0xF000 << 64) | (0xC000 << 48)
    for bit in range(128):
        if fixed >> bit & 1:
            continue
        seen = {value >> bit & 1 for value in values}
        assert seen == {0, 1}, f"bit {bit} never varies"


def test_a_call_and_its_redis_delivery_get_such_ids() -> None:
    from deferred_signals import proxy, redispush

    assert proxy.uuid4 is uuid4
    assert redispush.uuid4 is uuid4


def test_random_bytes_are_read_for_a_batch_of_ids_not_per_id(monkeypatch) -> None:
    from deferred_signals import ids

    reads = []
    real = os.urandom

    def urandom(size: int) -> bytes:
        reads.append(size)
        return real(size)

    monkeypatch.setattr(ids.os, "urandom", urandom)
    ids._random.values = []
    values = {uuid4() for _ in range(ids.BATCH * 3)}
    assert len(values) == ids.BATCH * 3
    assert reads == [16 * ids.BATCH] * 3


def test_threads_draw_from_random_values_of_their_own() -> None:
    from deferred_signals import ids

    ids._random.values = []
    uuid4()  # this thread now holds values for BATCH - 1 more ids
    seen: list[str] = []

    def draw() -> None:
        seen.extend(uuid4() for _ in range(ids.BATCH))

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    mine = [uuid4() for _ in range(ids.BATCH)]
    assert len(set(seen + mine)) == len(seen) + len(mine)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_forked_child_does_not_reuse_its_parents_random_values() -> None:
    from deferred_signals import ids

    ids._random.values = []
    uuid4()  # the parent now holds values for BATCH - 1 more ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave without cleanup
        try:
            os.close(read)
            os.write(write, "\n".join(uuid4() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split("\n")
    os.waitpid(pid, 0)
    parent = [uuid4() for _ in range(8)]
    assert len(child) == 8
    assert not set(child) & set(parent)
