"""A ``redis-server`` of a test's own, and ways to make it refuse writes.

A test that fills, pauses, demotes or locks a Redis must not do it to the shared server the
other tests (and other engineers' runs) use: it starts one of its own on a free loopback port,
with no persistence, through the ``private_redis`` fixture (``tests/conftest.py``).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest


class PrivateRedis:
    """A ``redis-server`` of one test's own on 127.0.0.1, with no persistence."""

    def __init__(self, directory: Path, *arguments: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / f"redis-{self.port}.log"
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(directory),
            "--logfile", str(self.log), *arguments,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        import redis

        self.password = _password(arguments)
        self.admin(self.password)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.02)

    def admin(self, password: str | None) -> None:
        """The test's own client, logging in with ``password``."""
        import redis

        self.client = redis.Redis(port=self.port, password=password)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _password(arguments: tuple[str, ...]) -> str | None:
    return arguments[arguments.index("--requirepass") + 1] if "--requirepass" in arguments else None


# --- faults: how to make a private Redis refuse writes, and how to make it accept them again


def oom(server: PrivateRedis) -> None:
    """Full, with nothing to evict: every write is refused with OOM."""
    server.client.config_set("maxmemory-policy", "noeviction")
    server.client.set("filler", b"x" * 2_000_000)
    server.client.config_set("maxmemory", 1_000_000)


def oom_over(server: PrivateRedis) -> None:
    server.client.delete("filler")
    server.client.config_set("maxmemory", 0)


def read_only(server: PrivateRedis) -> None:
    """A replica (of a primary that is not there): every write is refused with READONLY."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    server.client.replicaof("127.0.0.1", dead)


def read_only_over(server: PrivateRedis) -> None:
    server.client.replicaof("NO", "ONE")


def misconf(server: PrivateRedis) -> None:
    """The last snapshot failed and stop-writes-on-bgsave-error is on: MISCONF."""
    gone = Path(server.log.parent, f"gone-{server.port}")
    gone.mkdir()
    server.client.config_set("save", "3600 1")
    server.client.config_set("dir", str(gone))
    gone.rmdir()  # the snapshot cannot create its file
    server.client.bgsave()
    deadline = time.monotonic() + 10
    while server.client.info("persistence")["rdb_last_bgsave_status"] != "err":
        assert time.monotonic() < deadline, "the failing BGSAVE did not fail"
        time.sleep(0.02)


def misconf_over(server: PrivateRedis) -> None:
    server.client.config_set("stop-writes-on-bgsave-error", "no")


def wrong_password(server: PrivateRedis) -> None:
    """The password changed and every connection was closed: each new one gets WRONGPASS."""
    server.client.config_set("requirepass", "changed")
    server.client.client_kill_filter(_type="normal", skipme=True)
    server.admin("changed")


def wrong_password_over(server: PrivateRedis) -> None:
    server.client.config_set("requirepass", "secret")
    server.admin("secret")
