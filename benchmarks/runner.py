"""The runner: every variant of a case back to back in each round, with the queue checked."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.cases import Measured, Variant, Work
from benchmarks.services import Queue, count_traffic


@dataclass
class Runner:
    queue: Queue | None
    broker_up: bool
    problems: list[str] = field(default_factory=list)

    def measure(
        self,
        case: str,
        variants: Sequence[Variant],
        work: Work,
        *,
        rounds: int,
        per_round: int,
        warmup: int,
        quiet_gc: bool = True,
        publishes: bool = True,
    ) -> list[Measured]:
        results = [Measured(variant) for variant in variants]
        for measured in results:
            # Work that rolls back publishes nothing and runs without a broker.
            if measured.variant.needs_broker and publishes and not self.broker_up:
                measured.skipped = "skipped: Redis is down"
        active = [measured for measured in results if not measured.skipped]
        for round_number in range(rounds):
            # Rotate the order so no variant always runs first (cold) or last.
            shift = round_number % len(active) if active else 0
            for measured in active[shift:] + active[:shift]:
                with measured.variant.install():
                    for _ in range(warmup):
                        work()
                    measured.samples.add_round(_collect(work, per_round, quiet_gc))
                units = warmup + per_round if publishes else 0
                self.check_queue(case, measured.variant, units)
        return results

    def count_traffic(self, case: str, results: Sequence[Measured], work: Work, units: int) -> None:
        """A separate pass per variant, not timed: round trips and commands per unit."""
        for measured in results:
            if measured.skipped or not self.broker_up:
                continue
            with measured.variant.install():
                work()  # warm: connections, producer pool and queue declaration
                self.check_queue(case, measured.variant, 1)
                with count_traffic() as traffic:
                    for _ in range(units):
                        work()
                self.check_queue(case, measured.variant, units)
            measured.traffic, measured.traffic_units = traffic, units

    def peak_memory(self, case: str, results: Sequence[Measured], work: Work) -> None:
        """tracemalloc's peak over one unit of work, above what was allocated before it."""
        for measured in results:
            if measured.skipped:
                continue
            with measured.variant.install():
                work()
                self.check_queue(case, measured.variant, 1)
                gc.collect()
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    work()
                    measured.peak_memory = tracemalloc.get_traced_memory()[1] - base
                finally:
                    tracemalloc.stop()
                self.check_queue(case, measured.variant, 1)

    def check_queue(self, case: str, variant: Variant, units: int) -> None:
        """Purge the queue, and note it when it did not hold what the variant should publish.

        deferred_signals logs publish failures instead of raising them (the data is
        committed), so a fast but silent failure would otherwise look like a good figure.
        """
        if self.queue is None:
            return
        expected = variant.messages * units
        found = self.queue.purge()
        if found != expected:
            self.problems.append(
                f"{case} / {variant.label}: expected {expected} messages in the queue, "
                f"found {found}"
            )


def _collect(work: Work, count: int, quiet_gc: bool) -> list[float]:
    gc.collect()
    if not quiet_gc:
        # Long units (a 1,000-signal transaction): the collections a variant's allocations
        # cause are part of its cost.
        return [work() for _ in range(count)]
    # Short units: the collector is off while timing, as timeit does; a collection landing
    # in one variant's batch and not another's is noise, not a property of the variant.
    gc.disable()
    try:
        return [work() for _ in range(count)]
    finally:
        gc.enable()
