"""The durable path's own figure: how fast the relay drains the outbox to Redis.

Rows are written the way a failed publish spills them; each round times
``Relay().run_once()`` over them: claim (``SELECT ... FOR UPDATE SKIP LOCKED``, 500 a round),
publish through the bounded, confirmed path, delete, commit, after ``freeze_heap()`` as in the
``deferred_signals relay`` command's process. Wall-clock rows/s is the figure
of the target; rows per CPU second of this process moves less with the machine's load.
``DS_BENCH_PROFILE_RELAY=1`` prints a pyinstrument profile of one more round.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kombu.utils.uuid import uuid

from benchmarks import cases, summary
from benchmarks.benchapp import handlers
from benchmarks.benchapp.models import Item
from benchmarks.publish import _bodies
from benchmarks.runner import Runner
from benchmarks.stats import median, table

if TYPE_CHECKING:
    from benchmarks.run import Plan

ROWS = 5000
HANDLER = "bench.relayed"


def relay_case(runner: Runner, plan: Plan) -> None:
    from deferred_signals import outbox, registry
    from deferred_signals.dispatch import PendingCall
    from deferred_signals.relay import Relay, freeze_heap

    if not runner.broker_up:
        print("SKIPPED: Redis is down.")
        return
    items = list(Item.objects.order_by("pk")[:ROWS])
    if len(items) < ROWS:
        Item.objects.bulk_create(
            Item(name=f"relayed {n}", quantity=n, price=cases.PRICE) for n in range(ROWS)
        )
        items = list(Item.objects.order_by("pk")[:ROWS])
    bodies = _bodies(items)
    from deferred_signals.models import OutboxCall

    # Rows a slow earlier case spilled (its batch ran past PUBLISH_TIMEOUT) are not ours.
    OutboxCall.objects.all().delete()
    rounds = max(2, plan.case2.rounds)
    rates, cpu_rates = [], []
    profile, profiled = bool(os.environ.get("DS_BENCH_PROFILE_RELAY")), ""
    with cases.deferred(handlers.order_placed, [handlers.order_deferred], [HANDLER]):
        handler = registry.get(HANDLER)
        assert handler is not None
        freeze_heap()  # what the command does before relaying; undone for the other cases
        try:
            for _ in range(rounds):
                calls = [PendingCall(handler, uuid(), dict(body)) for body in bodies]
                assert outbox.spill(calls, "default", None)
                start, cpu = time.perf_counter(), time.process_time()
                published = Relay(databases=["default"]).run_once()
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                if runner.queue is not None:
                    found = runner.queue.purge()
                    if found != ROWS or published != ROWS:
                        runner.problems.append(
                            f"relay: published {published}, found {found} of {ROWS} messages"
                        )
                rates.append(published / elapsed)
                cpu_rates.append(published / cpu)
            if profile:  # one more round, not counted
                calls = [PendingCall(handler, uuid(), dict(body)) for body in bodies]
                assert outbox.spill(calls, "default", None)
                profiled = _profile(runner)
        finally:
            gc.unfreeze()
    rate = median(rates)
    print(
        f"Each round: {ROWS:,} due outbox rows, `Relay().run_once()` (claim 500 with SKIP "
        f"LOCKED, publish, delete, commit, per round trip) after `freeze_heap()`, as the "
        f"relay command runs it; {rounds} rounds.\n"
    )
    rows = [
        [f"round {n + 1}", f"{r:,.0f}", f"{c:,.0f}"]
        for n, (r, c) in enumerate(zip(rates, cpu_rates, strict=True))
    ]
    medians = ["median", f"{rate:,.0f}", f"{median(cpu_rates):,.0f}"]
    print(table(["round", "rows/s", "rows per CPU s"], [*rows, medians]))
    if profile:
        print(f"\nA profile of one more round:\n\n{profiled}")
    summary.add_target("10.7 relay to Redis", rate, 5000, at_most=False, unit="rows/s")
    summary.add_target("7 relay to Redis", rate, 2000, at_most=False, unit="rows/s")


def _profile(runner: Runner) -> str:
    from pyinstrument import Profiler

    from deferred_signals.relay import Relay

    profiler = Profiler(interval=0.0005)
    with profiler:
        Relay(databases=["default"]).run_once()
    if runner.queue is not None:
        runner.queue.purge()
    return str(profiler.output_text(unicode=False, color=False, show_all=False))


CASES: list[tuple[str, Callable[[Runner, Plan], None]]] = [
    ("relay. The relay: outbox rows published to Redis per second", relay_case),
]
