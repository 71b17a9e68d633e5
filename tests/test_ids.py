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


@pytest.fixture
def urandom_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the reads of random bytes from here on, starting with none kept."""
    from deferred_signals import ids

    reads: list[int] = []
    real = os.urandom

    def urandom(size: int) -> bytes:
        reads.append(size)
        return real(size)

    monkeypatch.setattr(ids.os, "urandom", urandom)
    monkeypatch.setattr(ids._random, "values", [])
    return reads


def test_random_bytes_are_read_for_a_batch_of_ids_not_per_id(urandom_reads: list[int]) -> None:
    from deferred_signals import ids

    values = {uuid4() for _ in range(ids.BATCH * 3)}
    assert len(values) == ids.BATCH * 3
    assert urandom_reads == [16 * ids.BATCH] * 3


def test_threads_share_the_values_and_never_get_the_same_id(urandom_reads: list[int]) -> None:
    from deferred_signals import ids

    seen: list[list[str]] = []

    def draw() -> None:
        seen.append([uuid4() for _ in range(ids.BATCH)])

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drawn = [value for values in seen for value in values]
    assert len(drawn) == 8 * ids.BATCH
    assert len(set(drawn)) == len(drawn)
    # Short-lived threads (or greenlets) do not read a batch each.
    assert len(urandom_reads) <= 8 + 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_forked_child_does_not_reuse_its_parents_random_values(urandom_reads: list[int]) -> None:
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


def test_a_process_forked_without_pythons_at_fork_hooks_reads_its_own(
    urandom_reads: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C-level fork (uWSGI's workers without py-call-osafterfork, gevent greenlets alive
    across a fork) runs no at-fork hook: the pid tells the values are the parent's."""
    from deferred_signals import ids

    parent = uuid4()
    left = list(ids._random.values)
    monkeypatch.setattr(ids.os, "getpid", lambda: -2)  # what the child's getpid says
    child = [uuid4() for _ in range(ids.BATCH)]
    assert len(urandom_reads) == 2
    assert not set(child) & {
        parent,
        *(str(uuid.UUID(int=(v & ids._KEEP) | ids._SET)) for v in left),
    }
