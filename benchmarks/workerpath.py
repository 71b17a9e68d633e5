"""The worker side of one message, in process: ours against a plain task doing the same work.

    python -m benchmarks.workerpath [--messages N] [--profile]

Runs what a prefork child runs for each message (Celery's tracer, built as the worker builds
it, then the task), plus the attributes the worker's main process reads from the task per
message and our check of the message there (``strategy.message_problem``). Both variants
fetch the same row; the handler's own work is the same trivial :func:`touch`. Prints the
cost per message of each and the difference, which is what deferred_signals adds on the
worker. ``--profile`` adds a pyinstrument profile of ours (installed by ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from django.dispatch import Signal

#: Task attributes Celery's main process reads per message (``Request.on_accepted`` and
#: ``on_success``); the others it reads once, when it builds the strategy and the tracer.
MAIN_PROCESS_READS = ("acks_late", "acks_late")


def _setup() -> None:
    from benchmarks import services

    found = services.probe()  # creates the benchmark database when missing
    if not found.postgres:
        raise SystemExit(f"PostgreSQL is not reachable: {found.postgres_error}")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from benchmarks import celery_app, report

    del celery_app
    report.prepare_database()


#: The no-row pair's signal: arguments only, nothing fetched.
ping = Signal()


def _variants() -> dict[str, Callable[[], None]]:
    from django.db import transaction
    from django.db.models.signals import post_save

    from benchmarks import cases
    from benchmarks.benchapp import handlers
    from benchmarks.benchapp.models import Item
    from benchmarks.celery_app import app
    from deferred_signals.testing import capture_deferred

    def worker_deferred(sender: Any, instance: Any, **kwargs: Any) -> None:
        handlers.touch(instance.pk)

    def worker_ping(sender: Any, key: str, n: int, **kwargs: Any) -> None:
        handlers.touch(key, n)

    worker_deferred.__qualname__ = "worker_deferred"
    worker_ping.__qualname__ = "worker_ping"
    with (
        cases.deferred(post_save, [worker_deferred], ["bench.worker"], Item),
        capture_deferred() as captured,
        transaction.atomic(),
    ):
        item = Item.objects.create(name="worker", quantity=1, price=cases.PRICE)
    row_body = json.loads(captured.calls[0].message)
    with (
        cases.deferred(ping, [worker_ping], ["bench.worker.ping"]),
        capture_deferred() as captured,
        transaction.atomic(),
    ):
        ping.send(sender=None, key="k", n=1)
    ping_body = json.loads(captured.calls[0].message)
    # The bound task objects a worker runs (not the shared_task proxies); the handlers stay
    # registered, as in a worker.
    plain, plain_ping = handlers.worker_plain.name, handlers.worker_plain_ping.name
    return {
        "ours": _runner(app, "bench.worker", [], row_body),
        "plain": _runner(app, plain, [item.pk], {}),
        "ours, no row": _runner(app, "bench.worker.ping", [], ping_body),
        "plain, no row": _runner(app, plain_ping, ["k", 1], {}),
    }


def _runner(app: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> Callable[[], None]:
    """One message through what the worker runs for it, main process and pool child."""
    from celery.app.trace import build_tracer
    from celery.utils import uuid
    from kombu.message import Message

    from deferred_signals import strategy
    from deferred_signals.tasks import DeferredHandlerTask

    task = app.tasks[name]
    trace = build_tracer(name, task, app=app, hostname="bench", eager=False)
    headers: dict[str, Any] = {"id": "x", "task": name, "retries": 0, "timelimit": [None, None]}
    message = Message(body=json.dumps([args, kwargs, None]), headers=headers)
    message.content_type, message.content_encoding = "application/json", "utf-8"
    ours = isinstance(task, DeferredHandlerTask)

    def run() -> None:
        if ours:  # our Strategy's check of each message, in the main process
            assert strategy.message_problem(message) is None
        else:
            message.payload  # noqa: B018 - decoded in the main process, as Celery does
        for attribute in MAIN_PROCESS_READS:
            getattr(task, attribute)
        call_id = uuid()
        trace(call_id, list(args), dict(kwargs), {"id": call_id, "delivery_info": {}})

    return run


def _time(func: Callable[[], None], count: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds of this process per call (CPU leaves out the database's)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        func()
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=2000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="pyinstrument profile of ours")
    args = parser.parse_args(argv)
    _setup()
    variants = _variants()
    for func in variants.values():
        _time(func, 200)  # warm up: connections, caches
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, func in variants.items():
            samples[name].append(_time(func, args.messages))
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"Per message, median of {args.rounds} rounds of {args.messages} (load {load}):\n")
    print(f"{'':22}{'wall µs':>10}{'CPU µs':>10}")
    medians = {
        name: [statistics.median(s[i] for s in samples[name]) * 1e6 for i in (0, 1)]
        for name in variants
    }
    for name, (wall, cpu) in medians.items():
        print(f"{name:22}{wall:10.1f}{cpu:10.1f}")
    for suffix in ("", ", no row"):
        (ours_wall, ours_cpu), (plain_wall, plain_cpu) = (
            medians[f"ours{suffix}"],
            medians[f"plain{suffix}"],
        )
        label = f"ours - plain{suffix}"
        print(f"{label:22}{ours_wall - plain_wall:10.1f}{ours_cpu - plain_cpu:10.1f}")
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0001)
        with profiler:
            _time(variants["ours"], args.messages)
        print(profiler.output_text(unicode=False, color=False, show_all=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
