"""Case 5e: end to end through one real worker (prefork, then threads): throughput, latency.

Throughput: N calls (``DS_BENCH_E2E_CALLS``, default 10,000) are committed while no worker
runs (transactions of 1,000 saves), then one worker starts and drains them; the rate is
taken from the first handler start to the last handler start, so the worker's start-up is
left out. deferred_signals (post_save handler, fresh row fetched by the worker) against a
plain Celery task that fetches the same row itself, same worker options.

Latency: with the worker warm, one call per transaction, commit → handler start, for ours
(on_commit and outbox) and the idiom, interleaved. Long: selected with ``--cases e2e``.

"Handler start" is the same point for both: once the row is fetched (ours: the worker's
fresh fetch before the handler runs; the plain task: its own ``get()`` before it records).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models.signals import post_save

from benchmarks import cases, settings, summary
from benchmarks.benchapp import handlers
from benchmarks.benchapp.models import Item
from benchmarks.runner import Runner
from benchmarks.services import redis_client
from benchmarks.stats import table

if TYPE_CHECKING:
    from benchmarks.run import Plan

CALLS = int(os.environ.get("DS_BENCH_E2E_CALLS", "10000"))
LATENCY_CALLS = int(os.environ.get("DS_BENCH_E2E_LATENCY_CALLS", "300"))
POOLS = ("prefork", "threads")
CONCURRENCY = 2
PREFIX = f"e2e-{settings.QUEUE}"
ROOT = Path(__file__).resolve().parent.parent


def _install(kind: str) -> Any:
    if kind == "idiom":
        return cases.plain(post_save, handlers.e2e_idiom, Item)
    func = handlers.e2e_deferred if kind == "on_commit" else handlers.e2e_deferred_outbox
    options = {"delivery": "outbox"} if kind == "outbox" else {}
    return cases.deferred(post_save, [func], [handlers.E2E_NAMES[kind]], Item, **options)


def _reset(client: Any) -> None:
    keys = list(client.scan_iter(match=f"{PREFIX}:*", count=1000))
    if keys:
        client.delete(*keys)


def _fill(kind: str, calls: int) -> None:
    with _install(kind):
        for start in range(0, calls, 1000):
            with transaction.atomic():
                for n in range(start, min(calls, start + 1000)):
                    Item.objects.create(name="e2e", quantity=n, price=cases.PRICE)


@contextmanager
def _worker(pool: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "DS_BENCH_WORKER": "1", "DJANGO_SETTINGS_MODULE": "benchmarks.settings"}
    command = [
        sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker",
        "--pool", pool, "--concurrency", str(CONCURRENCY), "--queues", settings.QUEUE,
        "--hostname", f"{settings.QUEUE}-{pool}@%h", "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_count(client: Any, count: int, timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(client.get(f"{PREFIX}:count") or 0) >= count:
            return True
        time.sleep(0.02)
    return False


def _drain(client: Any, kind: str, pool: str, runner: Runner) -> float:
    _reset(client)
    _fill(kind, CALLS)
    with _worker(pool):
        if not _wait_count(client, CALLS):
            runner.problems.append(f"e2e {pool} {kind}: the worker did not drain {CALLS} calls")
            return float("nan")
        first, last = float(client.get(f"{PREFIX}:first")), float(client.get(f"{PREFIX}:last"))
        if kind != "idiom":
            _latency(client, runner)
    return (CALLS - 1) / (last - first)


LATENCY: dict[str, dict[str, list[float]]] = {}


def _latency(client: Any, runner: Runner) -> None:
    """With the worker warm: one call per transaction, each kind in turn."""
    kinds = ("on_commit", "outbox", "idiom")
    _reset(client)
    for n in range(LATENCY_CALLS):
        kind = kinds[n % len(kinds)]
        with _install(kind), transaction.atomic():
            Item.objects.create(name="latency", quantity=n, price=cases.PRICE)
        time.sleep(0.01)
    if not _wait_count(client, LATENCY_CALLS, timeout=120):
        runner.problems.append("e2e latency: not every call ran")
    pool = os.environ.get("DS_BENCH_E2E_POOL", "?")
    for kind in kinds:
        raw = client.lrange(f"{PREFIX}:latency:{kind}", 0, -1)
        LATENCY.setdefault(pool, {})[kind] = sorted(float(value) for value in raw)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def e2e_case(runner: Runner, plan: Plan) -> None:
    if not runner.broker_up:
        print("SKIPPED: Redis is down.")
        return
    client = redis_client()
    rows, lat_rows = [], []
    for pool in POOLS:
        os.environ["DS_BENCH_E2E_POOL"] = pool
        ours = _drain(client, "on_commit", pool, runner)
        plain = _drain(client, "idiom", pool, runner)
        if runner.queue is not None:
            runner.queue.purge()
        rows.append([pool, f"{ours:,.0f}", f"{plain:,.0f}", f"{ours / plain:.2f}x"])
        summary.add_target(
            f"10.5 throughput, {pool}: ours / plain task", ours / plain, 1.0, at_most=False
        )
        found = LATENCY.get(pool, {})
        for kind in ("on_commit", "outbox", "idiom"):
            values = found.get(kind, [])
            lat_rows.append(
                [pool, kind, str(len(values)), f"{_percentile(values, 0.5) * 1e3:.2f}",
                 f"{_percentile(values, 0.99) * 1e3:.2f}"]
            )  # fmt: skip
        base = found.get("idiom", [])
        for kind in ("on_commit", "outbox"):
            values = found.get(kind, [])
            for q, label in ((0.5, "p50"), (0.99, "p99")):
                summary.add_target(
                    f"10.5 latency {label}, {pool}: ours ({kind}) / plain task",
                    _percentile(values, q) / _percentile(base, q),
                    1.0,
                )
        on_commit = found.get("on_commit", [])
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            summary.add_target(
                f"7 latency {label}, {pool}: outbox / on_commit",
                _percentile(found.get("outbox", []), q) / _percentile(on_commit, q),
                1.2,
            )
    _reset(client)
    print(
        f"Throughput: {CALLS:,} calls committed first, then drained by one worker "
        f"(--concurrency {CONCURRENCY}); first to last handler start. Latency: "
        f"{LATENCY_CALLS} transactions of one call, kinds interleaved, worker warm.\n"
    )
    print(table(["pool", "ours calls/s", "plain task calls/s", "ours / plain"], rows))
    print()
    print(table(["pool", "variant", "calls", "p50 ms", "p99 ms"], lat_rows))


CASES: list[tuple[str, Callable[[Runner, Plan], None]]] = [
    ("e2e. End to end through one worker: throughput and commit → start latency", e2e_case),
]
