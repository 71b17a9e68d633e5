"""The real services the benchmark needs: probing them, the queue it owns, and counters.

Nothing here imports Django, so the services can be probed (and a missing one reported)
before Django is set up against them.
"""

from __future__ import annotations

import os
import platform
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from benchmarks import settings

PACKAGES = ("deferred-signals", "Django", "celery", "kombu", "redis", "psycopg")


@dataclass
class Services:
    """What is reachable; an ``*_error`` says why a service is not."""

    postgres_version: str | None = None
    postgres_error: str = ""
    redis_version: str | None = None
    redis_error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def postgres(self) -> bool:
        return self.postgres_version is not None

    @property
    def redis(self) -> bool:
        return self.redis_version is not None


def probe() -> Services:
    """Check both services and create the benchmark database if it is missing."""
    found = Services()
    try:
        found.postgres_version = _ensure_database()
    except Exception as error:  # any failure means "skip what needs it", never a crash
        found.postgres_error = _one_line(error)
    try:
        client = redis_client()
        client.ping()
        found.redis_version = str(client.info("server")["redis_version"])
    except Exception as error:
        found.redis_error = _one_line(error)
    return found


def _ensure_database() -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=settings.PG_HOST,
        port=settings.PG_PORT,
        user=settings.PG_USER,
        password=settings.PG_PASSWORD or None,
        dbname="postgres",
        autocommit=True,
        connect_timeout=3,
    ) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (settings.PG_DATABASE,)
        ).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(settings.PG_DATABASE)))
        row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:100]}"


def redis_client() -> Any:
    import redis

    return redis.Redis(
        host=settings.REDIS_HOST,
        port=settings.REDIS_PORT,
        db=settings.REDIS_DB,
        socket_timeout=3,
        socket_connect_timeout=3,
    )


def environment(found: Services) -> list[tuple[str, str]]:
    """Facts printed above the tables: what produced these figures."""
    facts = [("Python", f"{platform.python_version()} ({sys.implementation.name})")]
    for name in PACKAGES:
        try:
            facts.append((name, version(name)))
        except PackageNotFoundError:
            facts.append((name, "not installed"))
    facts.append(("PostgreSQL", found.postgres_version or f"DOWN ({found.postgres_error})"))
    facts.append(("Redis", found.redis_version or f"DOWN ({found.redis_error})"))
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    facts.append(("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, load {load}"))
    facts.append(
        (
            "targets",
            f"postgresql://{settings.PG_HOST}:{settings.PG_PORT}/{settings.PG_DATABASE}, "
            f"redis://{settings.REDIS_HOST}:{settings.REDIS_PORT}/{settings.REDIS_DB} "
            f"queue {settings.QUEUE!r}",
        )
    )
    return facts


class Queue:
    """The benchmark's own Redis queue: nobody consumes it, so it is counted and purged."""

    def __init__(self) -> None:
        self.client = redis_client()
        self.name = settings.QUEUE

    def _keys(self) -> list[bytes]:
        # kombu keeps one list per priority step: the name itself, then name + sep + digit.
        return [key for key in self.client.scan_iter(match=f"{self.name}*", count=1000)]

    def depth(self) -> int:
        return sum(int(self.client.llen(key)) for key in self._keys())

    def purge(self) -> int:
        """Drop every waiting message; return how many there were."""
        keys = self._keys()
        count = sum(int(self.client.llen(key)) for key in keys)
        if keys:
            self.client.delete(*keys)
        return count

    def cleanup(self) -> None:
        """Leave the Redis database as found: our messages and kombu's binding for our queue."""
        self.purge()
        # kombu 5.7 records the queue's binding in two sets.
        self.client.delete(f"_kombu.binding.{self.name}", f"_kombu.binding_permanent.{self.name}")


@dataclass
class BrokerTraffic:
    """This process's Redis traffic over one measured stretch."""

    #: Writes to a Redis socket: one per command, one per whole pipeline. Each is followed
    #: by a wait for the reply, so this is the number of round trips.
    round_trips: int = 0
    #: Commands sent, by name (a pipeline's commands each count).
    commands: Counter[str] = field(default_factory=Counter)
    #: Bytes written to Redis (the messages, as the transport stores them, plus framing).
    bytes_sent: int = 0


@contextmanager
def count_traffic() -> Iterator[BrokerTraffic]:
    """Count this process's Redis round trips and commands inside the block.

    It wraps redis-py's one socket-write method, so it sees kombu's publishes and pipelines
    whatever path they take. Counted in the client because the Redis server is shared (the
    test suite's workers use it too), so its INFO commandstats are not ours alone. Used in
    separate passes, never while timing.
    """
    from redis.connection import AbstractConnection

    traffic = BrokerTraffic()
    original = AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        data = command if isinstance(command, bytes) else b"".join(map(bytes, command))
        traffic.round_trips += 1
        traffic.bytes_sent += len(data)
        traffic.commands.update(command_names(data))
        original(self, command, check_health)  # type: ignore[no-untyped-call]

    AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        yield traffic
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def command_names(data: bytes) -> list[str]:
    """The command names in a RESP-encoded write (one command, or a pipeline's many)."""
    names = []
    position = 0
    while position < len(data):
        end = data.index(b"\r\n", position)
        arguments = int(data[position + 1 : end])  # "*<count>"
        position = end + 2
        for index in range(arguments):
            end = data.index(b"\r\n", position)
            length = int(data[position + 1 : end])  # "$<length>"
            if index == 0:
                names.append(data[end + 2 : end + 2 + length].decode().lower())
            position = end + 2 + length + 2
    return names
