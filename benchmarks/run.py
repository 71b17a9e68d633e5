"""``make bench``: deferred_signals side by side with the usual hand-written idioms.

    python -m benchmarks.run [--quick] [--rounds N] [--cases 1,2,3b,4,e2e,memory,relay,...]

Runs against the real PostgreSQL and Redis on 127.0.0.1 (see ``benchmarks/settings.py``),
prints the environment, then one table per case. Timings are wall-clock, in the request
process, from ``atomic()`` to the end of the commit's callbacks (the publish included).
A service that is down skips what needs it, with a message; the exit status is 0 then too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from benchmarks import services
from benchmarks.stats import table


@dataclass(frozen=True)
class Step:
    """How much to measure in one case: rounds, and units of work per variant per round."""

    rounds: int
    per_round: int
    warmup: int


@dataclass(frozen=True)
class Plan:
    # Many short rounds rather than few long ones: on a shared machine a burst of load then
    # hits one round of every variant, and the per-round ratios shrug it off.
    case1: Step = Step(rounds=30, per_round=12, warmup=2)
    case2: Step = Step(rounds=5, per_round=1, warmup=0)
    case3: Step = Step(rounds=8, per_round=15, warmup=2)
    case5: Step = Step(rounds=10, per_round=3, warmup=1)

    def with_rounds(self, rounds: int) -> Plan:
        steps = (self.case1, self.case2, self.case3, self.case5)
        return Plan(*(replace(step, rounds=rounds) for step in steps))


FULL = Plan()
QUICK = Plan(Step(5, 6, 1), Step(2, 1, 0), Step(2, 5, 1), Step(3, 2, 1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer samples")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--cases",
        help="comma-separated case ids to run (default: all but the long ones, "
        "e2e and memory; 'all' runs everything)",
    )
    parser.add_argument("--no-chart", action="store_true", help="do not rewrite results.svg")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = plan.with_rounds(args.rounds)

    started = time.perf_counter()
    found = services.probe()
    print("# deferred_signals benchmark\n")
    print(table(["environment", ""], services.environment(found), numeric=False))
    print(
        "\nEvery variant of a case runs back to back in each round. "
        "Medians and p95 pool all samples; a ratio is taken within each round and given as "
        "the median over rounds (min-max in brackets)."
    )
    if not found.postgres:
        print(
            f"\nSKIPPED every case: PostgreSQL is not reachable ({found.postgres_error}). "
            "Start it (`make services`) and run `make bench` again."
        )
        return 0
    if not found.redis:
        print(
            f"\nNOTE: Redis is not reachable ({found.redis_error}): every variant that "
            "publishes to the broker is skipped; the others still run."
        )

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    # Imported after setup: they need the app registry and the Celery app.
    from benchmarks import celery_app, report, summary

    del celery_app  # imported for its side effect: it becomes Celery's current app

    service_errors = _service_errors()
    queue = services.Queue() if found.redis else None
    report.prepare_database()
    if queue is not None:
        leftover = queue.purge()
        if leftover:
            print(f"\n(purged {leftover} messages left in the queue by an interrupted run)")
    runner = report.make_runner(queue, found.redis)
    try:
        for title, case in report.selected(args.cases):
            print(f"\n## {title}\n")
            try:
                case(runner, plan)
            except service_errors as error:
                print(f"SKIPPED the rest of this case: a service failed ({error!r:.200}).")
    finally:
        try:
            report.cleanup(queue)
        except service_errors as error:
            print(f"\nCould not clean up (a service failed: {error!r:.200}).")
    summary.report()
    if not args.no_chart:
        drawn = summary.chart()
        if drawn is not None:
            print(f"\nChart: {drawn}")
    if runner.problems:
        print("\n## Problems\n")
        for problem in runner.problems:
            print(f"- {problem}")
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\nDone in {time.perf_counter() - started:.0f} s (load average now {load}).")
    return 0


def _service_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "a service went away", as opposed to a bug in the benchmark."""
    from django.db import InterfaceError, OperationalError
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (OperationalError, InterfaceError, BrokerError, RedisConnectionError, RedisTimeoutError)


if __name__ == "__main__":
    sys.exit(main())
