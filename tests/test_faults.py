"""The fault proxy does to real Redis, PostgreSQL and RabbitMQ clients what each mode promises.

The tests that need a service run once, in the PostgreSQL pass where the services are; the
rest need no service and run in both passes.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import redis
from kombu import Connection
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import require, wait_for
from tests.faults import FaultProxy
from tests.workers import BROKERS

REDIS_URL = BROKERS["redis"]
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
FAST = 1.0  # seconds: "fails fast" means within this, not after a client timeout
needs_services = pytest.mark.usefixtures("postgres_only")


def redis_client(proxy: FaultProxy) -> redis.Redis:
    # No retries: each call shows what one attempt through the proxy does.
    return redis.Redis.from_url(
        proxy.url_for(REDIS_URL), socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


def raw_connection(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=0.3)


def proxy_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("FaultProxy")]


@pytest.fixture
def redis_proxy() -> Iterator[FaultProxy]:
    require("redis")
    with FaultProxy(6379) as proxy:
        yield proxy


# -- no service needed -------------------------------------------------------------------------


def test_url_for_changes_only_host_and_port() -> None:
    with FaultProxy(5672) as proxy:
        assert proxy.url_for(AMQP_URL) == f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
        assert proxy.url_for("amqp://guest@localhost/vhost?heartbeat=5") == (
            f"amqp://guest@127.0.0.1:{proxy.port}/vhost?heartbeat=5"
        )
        with pytest.raises(ValueError, match="not for port 5672"):
            proxy.url_for(REDIS_URL)


def test_only_proxies_to_loopback() -> None:
    with pytest.raises(ValueError, match="only proxies to IPv4 loopback"):
        FaultProxy(6379, target_host="10.0.0.1")


def test_refuse_refuses_connects_at_once_and_forward_listens_again_on_the_same_port() -> None:
    with FaultProxy(6379) as proxy:
        port = proxy.port
        proxy.refuse()
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            raw_connection(proxy)
        assert time.monotonic() - started < FAST
        proxy.forward()
        assert proxy.port == port
        raw_connection(proxy).close()


def test_close_joins_the_thread_and_frees_the_port() -> None:
    before = len(proxy_threads())
    proxy = FaultProxy(6379).start()
    client = raw_connection(proxy)
    wait_for(lambda: proxy.connections == 1, timeout=2, what="the proxy to accept")
    proxy.close()
    proxy.close()  # idempotent
    assert len(proxy_threads()) == before
    assert proxy.connections == 0
    with pytest.raises(ConnectionRefusedError):
        raw_connection(proxy)
    with pytest.raises(RuntimeError, match="not running"):
        proxy.forward()
    client.close()


def test_hold_hides_a_reset_until_forward() -> None:
    # A stand-in service that can crash on cue; RabbitMQ does this on missed heartbeats.
    service = socket.create_server(("127.0.0.1", 0))
    with service, FaultProxy(service.getsockname()[1]) as proxy:
        client = raw_connection(proxy)
        upstream, _ = service.accept()
        proxy.hold()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        upstream.close()
        with pytest.raises(TimeoutError):
            client.recv(100)  # the client still sees an open, silent connection
        assert proxy.connections == 1
        proxy.forward()
        with pytest.raises(ConnectionResetError):
            client.recv(100)
        client.close()


# -- Redis ---------------------------------------------------------------------------------------


@needs_services
def test_forward_passes_commands_both_ways(redis_proxy: FaultProxy) -> None:
    client = redis_client(redis_proxy)
    assert client.ping()
    payload = b"through the proxy" * 200_000  # 3.4 MB: more than the proxy buffers at once
    client.set("deferred_signals:faults", payload)
    assert client.get("deferred_signals:faults") == payload
    client.delete("deferred_signals:faults")
    assert redis_proxy.connections == 1
    client.close()


@needs_services
def test_refuse_resets_open_connections(redis_proxy: FaultProxy) -> None:
    client = redis_client(redis_proxy)
    assert client.ping()
    redis_proxy.refuse()
    assert redis_proxy.connections == 0
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()  # the reset connection, then a refused reconnect
    assert time.monotonic() - started < FAST
    redis_proxy.forward()
    assert client.ping()
    client.close()


@needs_services
def test_blackhole_times_out_open_and_new_connections(redis_proxy: FaultProxy) -> None:
    opened = redis_client(redis_proxy)
    assert opened.ping()
    redis_proxy.blackhole()
    for client in (opened, redis_client(redis_proxy)):
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert 0.4 < time.monotonic() - started < 2
        client.close()


@needs_services
def test_blackhole_resets_on_forward_the_connections_that_lost_bytes(
    redis_proxy: FaultProxy,
) -> None:
    redis_proxy.blackhole()
    lost, idle = raw_connection(redis_proxy), raw_connection(redis_proxy)
    lost.sendall(b"PING\r\n")
    with pytest.raises(TimeoutError):
        lost.recv(100)
    redis_proxy.forward()
    with pytest.raises(ConnectionResetError):
        lost.recv(100)
    idle.sendall(b"PING\r\n")  # it lost nothing: it reaches Redis now
    assert idle.recv(100) == b"+PONG\r\n"
    lost.close()
    idle.close()


@needs_services
def test_hold_keeps_bytes_and_forward_delivers_them(redis_proxy: FaultProxy) -> None:
    opened = raw_connection(redis_proxy)
    redis_proxy.hold()
    new = raw_connection(redis_proxy)
    for sock in (opened, new):
        sock.sendall(b"PING\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(100)
    redis_proxy.forward()
    for sock in (opened, new):
        assert sock.recv(100) == b"+PONG\r\n"
        sock.close()


@needs_services
def test_hold_then_reset_all_fails_clients_and_forward_recovers(redis_proxy: FaultProxy) -> None:
    client = redis_client(redis_proxy)
    raw = raw_connection(redis_proxy)
    assert client.ping()
    redis_proxy.hold()
    raw.sendall(b"PING\r\n")
    with pytest.raises(TimeoutError):
        raw.recv(100)
    redis_proxy.reset_all()
    assert redis_proxy.connections == 0
    with pytest.raises(ConnectionResetError):
        raw.recv(100)  # the held PING was dropped, not delivered
    redis_proxy.forward()
    assert client.ping()  # redis-py reconnects, on the same port
    client.close()
    raw.close()


# -- PostgreSQL and RabbitMQ ---------------------------------------------------------------------


@needs_services
def test_postgres_through_the_proxy() -> None:
    require("postgres")
    with FaultProxy(5432) as proxy:

        def connect() -> psycopg.Connection[tuple[int]]:
            return psycopg.connect(
                host="127.0.0.1", port=proxy.port, user="postgres", dbname="postgres",
                connect_timeout=2,
            )  # fmt: skip

        with connect() as connection:
            assert connection.execute("SELECT 1").fetchone() == (1,)
            proxy.hold()
            proxy.reset_all()
            with pytest.raises(psycopg.OperationalError):
                connection.execute("SELECT 1")
        proxy.refuse()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="refused"):
            connect()
        assert time.monotonic() - started < FAST
        proxy.forward()
        with connect() as connection:
            assert connection.execute("SELECT 1").fetchone() == (1,)


@needs_services
def test_rabbitmq_through_the_proxy() -> None:
    require("rabbitmq")
    with FaultProxy(5672) as proxy:
        url = proxy.url_for(AMQP_URL)
        with Connection(url, connect_timeout=1) as connection:
            connection.ensure_connection(max_retries=0)
            assert connection.connected
        proxy.blackhole()
        started = time.monotonic()
        with (
            Connection(url, connect_timeout=0.5) as connection,
            pytest.raises(KombuOperationalError),
        ):
            connection.ensure_connection(max_retries=0)  # no Connection.Start ever comes
        assert 0.4 < time.monotonic() - started < 2
        proxy.refuse()
        started = time.monotonic()
        with (
            Connection(url, connect_timeout=1) as connection,
            pytest.raises(KombuOperationalError),
        ):
            connection.ensure_connection(max_retries=0)
        assert time.monotonic() - started < FAST
        proxy.forward()
        with Connection(url, connect_timeout=1) as connection:
            connection.ensure_connection(max_retries=0)
            assert connection.connected
