"""Dead letters kept by the worker's main process, written by a thread of their own.

The main process runs Celery's event loop: it takes messages, acknowledges them, answers
the broker's heartbeats and remote control, enforces time limits and starts pool children.
A dead letter written there (a call its pool lost, a refused message, a name no handler
answers to) stopped all of that for as long as the database took to answer, indefinitely
when it hangs. Such letters go to one writer thread instead: the message is acknowledged
already, so the thread retries while the database fails, and at shutdown the worker waits
a little for what is left (each letter it could not write is logged with its call id).
Elsewhere (tests, a pool child, a process that is no worker) a letter is written at once.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from celery import signals as celery_signals

from . import deadletters
from .conf import conf
from .execution import close_connections

logger = logging.getLogger("deferred_signals")

#: Letters waiting for the writer at most; past that, one is logged and dropped.
MAX_PENDING = 10_000
#: After a failed write: the first wait and the longest, doubling in between (seconds).
RETRY = (1.0, 60.0)
#: How long a worker's shutdown waits for the letters still waiting.
SHUTDOWN_WAIT = 10.0


class _Letter:
    __slots__ = ("fields", "lost")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.lost = False  # logged as lost (once: by the writer or by the shutdown)


_pending: queue.Queue[_Letter] = queue.Queue(MAX_PENDING)
_stopping = threading.Event()
_lock = threading.Lock()
_thread: threading.Thread | None = None
#: The worker main process the writer serves (set by Celery's worker_init).
_main_pid: int | None = None
#: The letter the writer is on, until written or given up.
_current: _Letter | None = None


def keep(**letter: Any) -> None:
    """Record a dead letter (:func:`deadletters.record`'s arguments) without blocking a
    worker's main process on the database."""
    if os.getpid() != _main_pid:
        try:
            deadletters.record(**letter)
        finally:
            close_connections()  # a main process rarely touches the database: keep none open
        return
    if not conf.dead_letters:
        return
    _start()
    entry = _Letter(letter)
    try:
        _pending.put_nowait(entry)
    except queue.Full:
        _lost(entry, f"{MAX_PENDING} dead letters are waiting for the database already")


def _start() -> None:
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(
                target=_write_all, name="deferred_signals dead letters", daemon=True
            )
            _thread.start()


def _write_all() -> None:
    global _current
    while True:
        letter = _current = _pending.get()
        delay = RETRY[0]
        try:
            while not _write(letter):
                close_connections()  # a broken connection is replaced at the next try
                if _stopping.wait(delay):
                    _lost(letter, "the worker stopped before the database took it")
                    break
                delay = min(RETRY[1], delay * 2)
        except Exception:  # never let the thread die: the letters behind it would wait forever
            logger.exception("deferred_signals: writing a dead letter failed")
        finally:
            _current = None
            close_connections()
            _pending.task_done()


def _write(letter: _Letter) -> bool:
    """Write ``letter``; False to try again later (the database could not be reached)."""
    fields = letter.fields
    try:
        kept = deadletters.write(**fields)
    except Exception as error:
        deadletters.unwritten(fields["call_id"], fields["handler"], fields["exception"])
        if deadletters.unreachable(error):
            return False
        _lost(letter, "the database refused it")  # for a reason of its own: it would again
        return True
    if kept:
        deadletters.announce(
            handler=fields["handler"],
            call_id=fields["call_id"],
            exception=fields["exception"],
            attempts=fields.get("attempts", 1),
        )
    return True


def _lost(letter: _Letter, why: str) -> None:
    with _lock:
        if letter.lost:
            return
        letter.lost = True
    fields = letter.fields
    logger.error(
        "LOST the dead letter of call %s (deferred handler %s, %s): %s",
        fields.get("call_id"),
        fields.get("handler"),
        type(fields.get("exception")).__name__,
        why,
    )


def on_worker_init(**_: Any) -> None:
    global _main_pid
    _main_pid = os.getpid()
    _stopping.clear()


def on_worker_shutdown(**_: Any) -> None:
    """Give the letters still waiting :data:`SHUTDOWN_WAIT` seconds, then log them as lost."""
    if os.getpid() != _main_pid or _thread is None:
        return
    done = threading.Event()

    def drained() -> None:
        _pending.join()
        done.set()

    threading.Thread(target=drained, daemon=True).start()
    if done.wait(SHUTDOWN_WAIT):
        return
    _stopping.set()  # the writer gives up its retries
    left = [] if _current is None else [_current]  # a hung database holds it
    while True:
        try:
            left.append(_pending.get_nowait())
        except queue.Empty:
            break
    for letter in left:
        _lost(letter, "the worker stopped before the database took it")


_UID = "deferred_signals.letter_writer"
celery_signals.worker_init.connect(on_worker_init, dispatch_uid=_UID)
celery_signals.worker_shutdown.connect(on_worker_shutdown, dispatch_uid=_UID)
