"""The suite's own promise: an absent service skips locally and fails under CI=true."""

from __future__ import annotations

import pytest

from tests import conftest


@pytest.fixture
def absent_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 1 on loopback: nothing listens there.
    monkeypatch.setitem(conftest.SERVICES, "redis", (1, "Redis", "make services"))


def test_absent_service_skips_locally_saying_how_to_start_it(
    absent_redis: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conftest, "CI", False)
    with pytest.raises(pytest.skip.Exception, match=r"0\.1:1; start it with: make services"):
        conftest.require("redis")


def test_absent_service_fails_under_ci(absent_redis: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true: Redis is not reachable"):
        conftest.require("redis")
