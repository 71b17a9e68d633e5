"""A real ``celery worker`` subprocess that is always stopped, whatever happens to the demo."""

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


class WorkerError(RuntimeError):
    """The worker did not start, or died; the message ends with the tail of its log."""


class Worker:
    """A worker started with ``start()``; ``stop()`` it in a ``finally``.

    The worker runs in a session of its own, so that a Ctrl-C typed at the demo reaches only
    the demo, which then shuts the worker down in order (a warm shutdown, then SIGKILL if it
    hangs). Stopping signals the whole process group, so no pool process can outlive it.
    POSIX only, like Celery's prefork pool.
    """

    def __init__(self, log_path: Path, *, concurrency: int = 2, stop_timeout: float = 30.0):
        self.log_path = log_path
        self.concurrency = concurrency
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

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
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )

    def wait_until_ready(self, timeout: float) -> float:
        """Seconds until the worker logged that it consumes; raises if it dies or is slow."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            # Celery logs "<hostname> ready." once the consumer is up, on every transport.
            if b" ready." in self.log_path.read_bytes():
                return time.monotonic() - start
            if self.process is not None and self.process.poll() is not None:
                raise WorkerError(f"The worker exited with code {self.process.returncode}.")
            time.sleep(0.05)
        raise WorkerError(f"The worker was not ready after {timeout:.0f} s.")

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no worker log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> float:
        """Stop the worker and every process of its group; seconds it took."""
        process, start = self.process, time.monotonic()
        if process is None:
            return 0.0
        try:
            if process.poll() is None:
                # SIGTERM to the main process is Celery's warm shutdown: running tasks finish,
                # the rest stay queued, and it stops its own pool processes.
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
        """Pids of the worker's process group still running (zombies do not count)."""
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
        # The worker leads its own session, so its process group id is its pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)
