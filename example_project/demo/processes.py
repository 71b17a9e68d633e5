"""The demo's subprocesses, a real ``celery worker`` and a real relay, always stopped in order.

Each runs in a session of its own, so that a Ctrl-C typed at the demo reaches only the demo,
which then shuts them down in order (SIGTERM, then SIGKILL if one hangs). Stopping signals
the whole process group, so no pool process can outlive it. POSIX only, like Celery's prefork
pool.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from django.conf import settings


class ProcessError(RuntimeError):
    """A subprocess did not start, or died; the message ends with the tail of its log."""


class Service:
    """A long-running subprocess started with ``start()``; ``stop()`` it in a ``finally``."""

    #: What the process logs once it is up.
    ready_marker = b""
    name = "process"

    def __init__(
        self, log_path: Path, *, env: dict[str, str] | None = None, stop_timeout: float = 30.0
    ):
        self.log_path = log_path
        self.extra_env = env or {}
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        # Only what the demo gives this process reaches it (DEMO_PUBLISH_VIA: see settings).
        env = {key: value for key, value in os.environ.items() if key != "DEMO_PUBLISH_VIA"}
        return {**env, "PYTHONUNBUFFERED": "1", **self.extra_env}

    @property
    def started(self) -> bool:
        return self.process is not None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
        )

    def wait_until_ready(self, timeout: float) -> float:
        """Seconds until the process logged that it is up; raises if it dies or is slow."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.ready_marker in self.log_path.read_bytes():
                return time.monotonic() - start
            if not self.running():
                raise ProcessError(f"The {self.name} exited with code {self.returncode}.")
            time.sleep(0.05)
        raise ProcessError(f"The {self.name} was not ready after {timeout:.0f} s.")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no {self.name} log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> float:
        """Stop the process and every process of its group; seconds it took."""
        process, start = self.process, time.monotonic()
        if process is None:
            return 0.0
        try:
            if process.poll() is None:
                # SIGTERM: a worker's warm shutdown (running tasks finish, the rest stay
                # queued, it stops its own pool); the relay finishes the round in hand.
                process.terminate()
                try:
                    process.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    process.wait()
            self._reap_group()
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: no more patience
            self._signal_group(signal.SIGKILL)
            process.wait()
            raise
        finally:
            if self._log is not None:
                self._log.close()
        return time.monotonic() - start

    def leftovers(self) -> list[int]:
        """Pids of the process group still running (zombies do not count)."""
        if self.process is None:
            return []
        proc = Path("/proc")
        if not proc.is_dir():  # not Linux: the group exists or it does not
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return []
            return [self.pid]
        pids = []
        for stat in proc.glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces, hence the rsplit.
                state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
            if int(pgrp) == self.pid and state != "Z":
                pids.append(int(stat.parent.name))
        return pids

    def _reap_group(self) -> None:
        # Pool processes exit with their parent; give them a moment, then insist.
        deadline = time.monotonic() + 5
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.leftovers():
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> None:
        # The process leads its own session, so its process group id is its pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)


class Worker(Service):
    """``celery worker`` consuming the project's queue, as production starts it."""

    ready_marker = b" ready."  # Celery logs "<hostname> ready." once it consumes
    name = "worker"

    def __init__(self, log_path: Path, *, concurrency: int = 4, stop_timeout: float = 30.0):
        super().__init__(log_path, stop_timeout=stop_timeout)
        self.concurrency = concurrency

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "--workdir",
            str(settings.BASE_DIR),
            "--app",
            "example_project",
            "worker",
            "--queues",
            settings.QUEUE,
            "--loglevel",
            "INFO",
            "--concurrency",
            str(self.concurrency),
            # A name of its own, so a `make worker` running beside it is not a clash.
            "--hostname",
            f"demo-{os.getpid()}@%h",
            # Mingle and gossip are for clusters: they would only add start-up time here.
            "--without-mingle",
            "--without-gossip",
        ]


class Relay(Service):
    """``manage.py deferred_signals relay``: publishes what the outbox holds, until stopped."""

    ready_marker = b"relaying the outbox"
    name = "relay"

    @property
    def command(self) -> list[str]:
        manage = str(settings.BASE_DIR / "manage.py")
        # -v 2: a line per round that published something.
        return [sys.executable, manage, "deferred_signals", "--verbosity", "2", "relay"]
