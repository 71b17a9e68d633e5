"""The ids of calls and deliveries: random version-4 UUIDs, in their usual string form."""

from __future__ import annotations

import uuid

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
