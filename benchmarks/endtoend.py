"""Case 5e: end to end through one real worker (prefork, then threads): throughput, latency.

Throughput: ``DS_BENCH_E2E_CALLS`` calls per variant (default 10,000) in
``DS_BENCH_E2E_ROUNDS`` rounds (default 5). In each round, each variant's share is committed
while no worker runs (transactions of 1,000 saves), then a fresh worker drains it; the rate
is taken from the first handler start to the last, so the worker's start-up is left out.
The variants alternate which goes first from round to round, and the ratio is taken within
each round (median over rounds): a burst of load on this shared machine, or an order effect
(autovacuum after the fill, a warm page cache), then hits both sides. deferred_signals
(post_save handler, fresh row fetched by the worker) against a plain Celery task that
fetches the same row itself, same worker options. Also printed: the CPU each process kind
spent per call while draining (the worker's main process, its pool children, Redis), read
from ``/proc``, which says where a gap comes from.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models.signals import post_save

from benchmarks import cases, settings, summary
from benchmarks.benchapp import handlers
from benchmarks.benchapp.models import Item
from benchmarks.runner import Runner
from benchmarks.services import redis_client
from benchmarks.stats import Ratio, median, table

if TYPE_CHECKING:
    from benchmarks.run import Plan

CALLS = int(os.environ.get("DS_BENCH_E2E_CALLS", "10000"))
ROUNDS = max(1, int(os.environ.get("DS_BENCH_E2E_ROUNDS", "5")))
#: 500 per kind: a p99 of 100 samples is their second largest, which one hiccup of a shared
#: machine decides (runs flipped between 0.68x and 1.14x the plain task's); of 500, the fifth.
LATENCY_CALLS = int(os.environ.get("DS_BENCH_E2E_LATENCY_CALLS", "1500"))
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
        # As root (these machines), Celery warns once per worker: not a figure, only noise.
        sys.executable, "-W", "ignore:You're running the worker with superuser privileges",
        "-m", "celery", "-A", "benchmarks.celery_app", "worker",
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


@dataclass
class Drain:
    """One variant's share of one round: its rate, and the CPU per call of each process kind."""

    rate: float
    cpu: dict[str, float]


def _drain(
    client: Any, kind: str, pool: str, calls: int, runner: Runner, *, latency: bool
) -> Drain | None:
    _reset(client)
    _fill(kind, calls)
    with _worker(pool) as process:
        if not _wait_count(client, 1):
            runner.problems.append(f"e2e {pool} {kind}: the worker ran no call")
            return None
        before = cpu_by_kind(process.pid)
        if not _wait_count(client, calls):
            runner.problems.append(f"e2e {pool} {kind}: the worker did not drain {calls} calls")
            return None
        after = cpu_by_kind(process.pid)
        first, last = float(client.get(f"{PREFIX}:first")), float(client.get(f"{PREFIX}:last"))
        if latency:
            _latency(client, runner)
    # The CPU between the first start and the last: the calls after the first.
    cpu = {name: (after[name] - before[name]) / max(1, calls - 1) for name in before}
    return Drain((calls - 1) / (last - first), cpu)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CPU_KINDS = ("worker main", "pool children", "redis")


def cpu_by_kind(main: int) -> dict[str, float]:
    """CPU seconds so far of the worker's main process, its children, and redis-server.

    Read from ``/proc`` (Linux); elsewhere every figure is NaN.
    """
    found = dict.fromkeys(CPU_KINDS, 0.0)
    proc = Path("/proc")
    if not proc.is_dir():
        return dict.fromkeys(CPU_KINDS, float("nan"))
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # gone since the listing
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        if int(entry.name) == main:
            found["worker main"] += seconds
        elif int(fields[1]) == main:
            found["pool children"] += seconds
        elif name.startswith("redis"):
            found["redis"] += seconds
    return found


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


Rounds = tuple[list[float], list[Drain], list[Drain]]


def _throughput(client: Any, pool: str, runner: Runner) -> Rounds:
    """Alternating rounds of both variants; the ratio of each round, and every drain."""
    share = max(2, CALLS // ROUNDS)
    ratios: list[float] = []
    ours: list[Drain] = []
    plain: list[Drain] = []
    for number in range(ROUNDS):
        order = ("on_commit", "idiom") if number % 2 == 0 else ("idiom", "on_commit")
        drains: dict[str, Drain | None] = {}
        for kind in order:
            # Latency once per pool, with the warm worker of the last round's deferred drain.
            last = number == ROUNDS - 1 and kind == "on_commit"
            drains[kind] = _drain(client, kind, pool, share, runner, latency=last)
        mine, theirs = drains["on_commit"], drains["idiom"]
        if mine is None or theirs is None:
            continue
        ours.append(mine)
        plain.append(theirs)
        ratios.append(mine.rate / theirs.rate)
    return ratios, ours, plain


def _cpu_row(label: str, drains: list[Drain]) -> list[str]:
    return [label] + [
        f"{median([drain.cpu[name] for drain in drains]) * 1e6:,.0f}" for name in CPU_KINDS
    ]


def e2e_case(runner: Runner, plan: Plan) -> None:
    if not runner.broker_up:
        print("SKIPPED: Redis is down.")
        return
    client = redis_client()
    rows, lat_rows, cpu_rows = [], [], []
    for pool in POOLS:
        os.environ["DS_BENCH_E2E_POOL"] = pool
        ratios, ours, plain = _throughput(client, pool, runner)
        if runner.queue is not None:
            runner.queue.purge()
        if not ratios:
            continue
        ratio = Ratio(ratios)
        rates = [f"{median([drain.rate for drain in side]):,.0f}" for side in (ours, plain)]
        rows.append([pool, *rates, str(ratio), " ".join(f"{value:.2f}" for value in ratios)])
        cpu_rows.append(_cpu_row(f"{pool}: ours", ours))
        cpu_rows.append(_cpu_row(f"{pool}: plain task", plain))
        summary.add_target(
            f"10.5 throughput, {pool}: ours / plain task", ratio.value, 1.0, at_most=False
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
        f"Throughput: {CALLS:,} calls per variant in {ROUNDS} rounds, the variants taking turns "
        f"to go first; each share committed first, then drained by a fresh worker "
        f"(--concurrency {CONCURRENCY}); first to last handler start. Rates are medians over "
        f"rounds, the ratio the median of the rounds' ratios (min-max). Latency: "
        f"{LATENCY_CALLS} transactions of one call, kinds interleaved, worker warm.\n"
    )
    print(
        table(
            ["pool", "ours calls/s", "plain task calls/s", "ours / plain", "each round"],
            rows,
            numeric=False,
        )
    )
    print("\nCPU per call while draining, µs (median over rounds):\n")
    print(table(["pool: variant", *CPU_KINDS], cpu_rows))
    print()
    print(table(["pool", "variant", "calls", "p50 ms", "p99 ms"], lat_rows))


CASES: list[tuple[str, Callable[[Runner, Plan], None]]] = [
    ("e2e. End to end through one worker: throughput and commit → start latency", e2e_case),
]
