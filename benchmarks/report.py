"""Runs each case and prints its table, with the ratios worth quoting under it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from django.core.management import call_command
from django.db import connection

from benchmarks import cases, durable, endtoend, memory, publish, repeats, summary
from benchmarks.benchapp import handlers
from benchmarks.benchapp.models import Item
from benchmarks.cases import Measured
from benchmarks.runner import Runner
from benchmarks.services import Queue
from benchmarks.stats import kib, ms, table, times, us

if TYPE_CHECKING:
    from benchmarks.run import Plan


def prepare_database() -> None:
    """The benchmark's table, created on first use and emptied; the outbox tables migrated."""
    call_command("migrate", "deferred_signals", verbosity=0)
    with connection.schema_editor() as editor:
        if Item._meta.db_table not in connection.introspection.table_names():
            editor.create_model(Item)
    _truncate()


def cleanup(queue: Queue | None) -> None:
    if queue is not None:
        queue.cleanup()
    _truncate()


def _truncate() -> None:
    from deferred_signals.models import OutboxCall

    tables = ", ".join(
        connection.ops.quote_name(model._meta.db_table) for model in (Item, OutboxCall)
    )
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} RESTART IDENTITY")


def make_runner(queue: Queue | None, broker_up: bool) -> Runner:
    return Runner(queue=queue, broker_up=broker_up)


def _trips(measured: Measured) -> str:
    if measured.traffic is None:
        return "-"
    return _per(measured.traffic.round_trips, measured.traffic_units)


def _kib_sent(measured: Measured) -> str:
    if measured.traffic is None:
        return "-"
    return f"{measured.traffic.bytes_sent / measured.traffic_units / 1024:,.1f}"


def _commands(measured: Measured) -> str:
    if measured.traffic is None:
        return "-"
    counts = sorted(measured.traffic.commands.items(), key=lambda item: (-item[1], item[0]))
    return (
        ", ".join(f"{name} {_per(calls, measured.traffic_units)}" for name, calls in counts)
        or "none"
    )


def _per(count: int, units: int) -> str:
    value = count / units
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def _percent(ratio: float) -> str:
    return "-" if math.isnan(ratio) else f"{(ratio - 1) * 100:+.0f}%"


def _by_key(results: Sequence[Measured]) -> dict[str, Measured]:
    return {measured.variant.key: measured for measured in results if not measured.skipped}


# --- case 1 -------------------------------------------------------------------------------


def case1(runner: Runner, plan: Plan) -> None:
    work = cases.timed(cases.save_one_row)
    results = runner.measure(
        "case 1",
        cases.CASE1,
        work,
        rounds=plan.case1.rounds,
        per_round=plan.case1.per_round,
        warmup=plan.case1.warmup,
    )
    runner.count_traffic("case 1", results, work, units=20)
    figures = summary.add_case("1 row, 1 handler", results)
    summary.add_target(
        "10.1 one row, one handler: ours / idiom",
        summary.ratio(figures, "deferred"),
        0.70,
        floor=summary.ratio(figures, "none"),
    )
    summary.add_target(
        "7 one row, outbox: ours / idiom",
        summary.ratio(figures, "outbox"),
        1.0,
        floor=summary.ratio(figures, "none"),
    )
    base = results[0]
    rows = []
    for measured in results:
        if measured.skipped:
            rows.append([measured.variant.label, measured.skipped, *[""] * 6])
            continue
        ratio = measured.samples.ratio_to(base.samples)
        added = measured.samples.median - base.samples.median
        rows.append(
            [
                measured.variant.label,
                ms(measured.samples.median),
                ms(measured.samples.p95),
                str(ratio),
                f"{added * 1e3:+.3f}",
                _trips(measured),
                _commands(measured),
                _kib_sent(measured),
            ]
        )
    print(
        f"Each sample: `with atomic(): Item.objects.create(...)`, commit and on_commit callbacks "
        f"included; {plan.case1.rounds} rounds of {plan.case1.per_round} transactions per "
        "variant.\n"
    )
    headers = [
        "variant",
        "median ms",
        "p95 ms",
        "x baseline",
        "added ms",
        "Redis round trips/txn",
        "Redis commands/txn",
        "KiB sent/txn",
    ]
    print(table(headers, rows))
    found = _by_key(results)
    if "deferred" in found and "idiom" in found:
        deferred, idiom = found["deferred"], found["idiom"]
        quote = (
            f"\n> deferred_signals adds {_percent(deferred.samples.ratio_to(base.samples).value)} "
            f"to a 1-row transaction; on_commit+delay adds "
            f"{_percent(idiom.samples.ratio_to(base.samples).value)}"
        )
        if "delay_on_commit" in found:
            docr = found["delay_on_commit"].samples.ratio_to(base.samples).value
            quote += f", delay_on_commit {_percent(docr)}"
        print(quote + ".")
        ratio = deferred.samples.ratio_to(idiom.samples)
        print(f"> deferred_signals / on_commit+delay, whole transaction: {ratio}")


# --- case 2 -------------------------------------------------------------------------------


def case2(runner: Runner, plan: Plan) -> None:
    count = cases.SIGNALS_PER_TRANSACTION
    Item.objects.bulk_create(
        Item(name=f"item {n}", quantity=n, price=cases.PRICE) for n in range(count)
    )
    items = list(Item.objects.order_by("pk")[:count])
    work = cases.timed(lambda: cases.fire_thousand(items))
    results = runner.measure(
        "case 2",
        cases.CASE2,
        work,
        rounds=plan.case2.rounds,
        per_round=plan.case2.per_round,
        warmup=plan.case2.warmup,
        quiet_gc=False,
    )
    runner.count_traffic("case 2", results, work, units=1)
    runner.peak_memory("case 2", results, work)
    figures = summary.add_case("1,000 rows", results)
    summary.add_target("10.2 1,000 calls: ours / idiom", summary.ratio(figures, "deferred"), 0.35)
    summary.add_target(
        "10.7 1,000 calls, outbox: ours / idiom", summary.ratio(figures, "outbox"), 0.5
    )
    summary.add_target("7 1,000 calls, outbox: ours / idiom", summary.ratio(figures, "outbox"), 0.6)
    found = _by_key(results)
    reference = found.get("deferred")
    rows = []
    for measured in results:
        if measured.skipped:
            rows.append([measured.variant.label, measured.skipped, *[""] * 7])
            continue
        samples = measured.samples
        rows.append(
            [
                measured.variant.label,
                ms(samples.median),
                ms(samples.p95),
                us(samples.median / count),
                str(samples.ratio_to(reference.samples)) if reference else "-",
                _trips(measured),
                _commands(measured),
                _kib_sent(measured),
                kib(measured.peak_memory),
            ]
        )
    print(
        f"Each sample: one transaction with one UPDATE, then {count:,} "
        "`order_placed.send(sender=Item, instance=item, amount=Decimal, tags=[...], "
        f"placed_at=datetime)`, commit and publish included; {plan.case2.rounds} rounds of "
        f"{plan.case2.per_round} transaction(s) per variant. Peak memory: tracemalloc over "
        "one transaction, in a separate pass.\n"
    )
    headers = [
        "variant",
        "median ms/txn",
        "p95 ms",
        "us/signal",
        "x deferred_signals",
        "Redis round trips/txn",
        "Redis commands/txn",
        "KiB sent/txn",
        "peak KiB",
    ]
    print(table(headers, rows))
    if reference and "idiom" in found:
        idiom = found["idiom"]
        quote = (
            f"\n> {count:,} signals in one transaction: deferred_signals is "
            f"{times(idiom.samples.ratio_to(reference.samples).value)} faster than "
            "on_commit+delay"
        )
        if "delay_on_commit" in found:
            ratio = found["delay_on_commit"].samples.ratio_to(reference.samples).value
            quote += f" and {times(ratio)} faster than delay_on_commit"
        print(
            f"{quote}; broker round trips {_trips(reference)} vs {_trips(idiom)}; "
            f"peak memory {kib(reference.peak_memory)} vs {kib(idiom.peak_memory)} KiB."
        )


# --- case 3 -------------------------------------------------------------------------------


def case3(runner: Runner, plan: Plan) -> None:
    item = Item.objects.create(name="fanout", quantity=1, price=cases.PRICE)
    sends: dict[str, list[Measured]] = {}
    commits: dict[str, list[Measured]] = {}
    for payload_name, payload in cases.PAYLOADS.items():
        sends[payload_name] = runner.measure(
            f"case 3 send {payload_name}",
            cases.CASE3,
            cases.sends_only(item, payload),
            rounds=plan.case3.rounds,
            per_round=plan.case3.per_round,
            warmup=plan.case3.warmup,
            publishes=False,
        )
        one_commit = cases.timed(cases.send_and_commit(item, payload))
        commits[payload_name] = runner.measure(
            f"case 3 commit {payload_name}",
            cases.CASE3,
            one_commit,
            rounds=plan.case3.rounds,
            per_round=plan.case3.per_round,
            warmup=plan.case3.warmup,
        )
        runner.count_traffic(f"case 3 {payload_name}", commits[payload_name], one_commit, units=10)
    encodes = {variant.key: _encodes_per_send(variant, item) for variant in cases.CASE3}
    rows = []
    for index, variant in enumerate(cases.CASE3):
        for payload_name in cases.PAYLOADS:
            send, commit = sends[payload_name][index], commits[payload_name][index]
            txn = (
                [commit.skipped, "", ""]
                if commit.skipped
                else [ms(commit.samples.median), ms(commit.samples.p95), _trips(commit)]
            )
            rows.append(
                [
                    variant.label,
                    payload_name,
                    us(send.samples.median),
                    us(send.samples.p95),
                    encodes[variant.key],
                    *txn,
                ]
            )
    print(
        "One `fanout.send(sender=Item, instance=item, probe=..., [lines=100 order lines])` "
        "received by 1 or 10 deferred handlers. send(): the signal alone, in a transaction "
        f"then rolled back ({cases.SENDS_PER_SAMPLE} sends per sample; nothing published). "
        "txn: one send, commit and publish. Encodes/send: calls of a codec registered for "
        "the probe argument.\n"
    )
    headers = [
        "handlers",
        "payload",
        "send() median us",
        "p95 us",
        "encodes/send",
        "txn median ms",
        "txn p95 ms",
        "Redis round trips/txn",
    ]
    print(table(headers, rows))
    one_light, ten_light = sends["light"]
    one_heavy, ten_heavy = sends["heavy"]
    # The heavy payload's extra cost is its encoding; paid once per send it barely grows
    # with the handlers, paid once per handler it grows tenfold.
    delta_one = one_heavy.samples.median - one_light.samples.median
    delta_ten = ten_heavy.samples.median - ten_light.samples.median
    print(
        f"\n> encoding the 100 order lines costs {us(delta_one)} us with 1 handler and "
        f"{us(delta_ten)} us with 10 (ratio {delta_ten / delta_one:.2f}; 1 = encoded once per "
        f"send, 10 = once per handler). 10 handlers vs 1, per send: "
        f"{ten_heavy.samples.ratio_to(one_heavy.samples)} (heavy), "
        f"{ten_light.samples.ratio_to(one_light.samples)} (light)."
    )


def _encodes_per_send(variant: cases.Variant, item: Item) -> str:
    work = cases.sends_only(item, cases.PAYLOADS["heavy"])
    with variant.install():
        # Steady state: a proxy connected after a send of the same objects reuses that
        # send's encoding (deferred_signals' per-send cache), so count the second batch.
        work()
        before = handlers.ProbeCounter.encodes
        work()
        calls = handlers.ProbeCounter.encodes - before
    return f"{calls / cases.SENDS_PER_SAMPLE:.2f}"


CASES: list[tuple[str, Callable[[Runner, Plan], None]]] = [
    ("1. Request path: one transaction saving one row, one post_save handler", case1),
    ("2. One transaction firing 1,000 signals (and 4. its peak memory)", case2),
    ("3. Encoding: one send received by 1 or 10 deferred handlers", case3),
    ("3b. One row, ten post_save handlers", repeats.case3b),
    ("4. One row saved ten times in one transaction, coalesce=True", repeats.case4),
    ("5. Publish step: 1,000 messages, Task.apply_async vs the lean builder", publish.case5),
]


#: Cases left out of the default run: they take minutes (worker processes, 100,000 saves).
LONG = {"e2e", "memory"}


def selected(names: str | None) -> list[tuple[str, Callable[[Runner, Plan], None]]]:
    """The cases ``--cases`` names (their number or id: ``1,2,3b,4,5,relay,e2e,memory``)."""
    every = CASES + durable.CASES + memory.CASES + endtoend.CASES
    if names == "all":
        return every
    ids = {title.split(".")[0].split(" ")[0] for title, _ in every}
    if names is None:
        return [(title, case) for title, case in every if _id(title) not in LONG]
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    unknown = wanted - ids
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; choose from {sorted(ids)}")
    return [(title, case) for title, case in every if _id(title) in wanted]


def _id(title: str) -> str:
    return title.split(".")[0].split(" ")[0]
