"""Real ``celery worker`` processes on real brokers, for the end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
#: The Redis database of the tests that read what was published; DS_TEST_REDIS_URL, which also
#: moves the workers' broker, keeps every test on one database of a shared server.
PUBLISH_REDIS_URL = os.environ.get("DS_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
BROKERS = {
    "redis": os.environ.get("DS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
    "rabbitmq": os.environ.get("DS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
}


def make_app(name: str, broker_url: str) -> Celery:
    """A publishing app on another broker (JSON, Celery's defaults, like the project's)."""
    return Celery(name, broker=broker_url, set_as_current=False)


class Worker:
    """One ``celery -A tests.celery_app worker`` process consuming a queue of its own."""

    def __init__(
        self,
        broker: str,
        databases: dict[str, str],
        log_dir: Path,
        *,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
    ) -> None:
        self.broker = broker
        self.pool = pool
        self.url = BROKERS[broker]
        self.queue = f"ds-tests-{broker}-{uuid.uuid4().hex[:8]}"
        self.log_path = log_dir / f"worker-{broker}-{pool}-{self.queue[-8:]}.log"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings_postgres",
            "DS_TEST_BROKER": self.url,
            "DS_TEST_QUEUE": self.queue,
            "DS_TEST_EAGER": "0",
            "DS_TEST_DB_DEFAULT": databases["default"],
            "DS_TEST_DB_OTHER": databases["other"],
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        # The test process publishes through an app of its own on the same broker.
        self.app = make_app(f"tests-{broker}", self.url)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        command = [
            sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker",
            "--queues", self.queue,
            "--hostname", f"{self.queue}@%h",
            "--pool", self.pool, "--concurrency", "2",
            "--without-gossip", "--without-mingle",
            "--loglevel", "INFO",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        readies = self.log().count(" ready.")  # a restart appends to the same log
        while self.log().count(" ready.") <= readies:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the {self.broker} worker did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # warm shutdown: the worker stops its pool processes itself
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the process group
        process.wait()

    def delete_queue(self) -> None:
        with self.app.connection_for_write() as connection:
            connection.default_channel.queue_delete(self.queue)
        self.app.close()
