"""Cases 3b and 4: one row with ten post_save handlers; one row saved ten times (coalesce).

Both print every variant against the floor (no receiver) and the idiom, and count the
messages each transaction leaves in the queue (case 4: exactly one with ``coalesce=True``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from benchmarks import cases, summary
from benchmarks.benchapp.models import Item
from benchmarks.cases import Measured, Variant
from benchmarks.runner import Runner
from benchmarks.stats import ms, table

if TYPE_CHECKING:
    from benchmarks.run import Plan


def _print(results: Sequence[Measured], figures: summary.CaseFigures) -> None:
    rows = []
    for measured in results:
        if measured.skipped:
            rows.append([measured.variant.label, measured.skipped, "", "", "", ""])
            continue
        key = measured.variant.key
        rows.append(
            [
                measured.variant.label,
                ms(measured.samples.median),
                ms(measured.samples.p95),
                str(figures.to_floor.get(key, "-")),
                str(figures.to_idiom.get(key, "-")),
                str(measured.variant.messages),
            ]
        )
    headers = ["variant", "median ms", "p95 ms", "/ floor", "/ idiom", "messages/txn"]
    print(table(headers, rows))


def _measure(
    runner: Runner, plan: Plan, name: str, variants: Sequence[Variant], work: cases.Work
) -> list[Measured]:
    step = plan.case3
    return runner.measure(
        name, variants, work, rounds=step.rounds, per_round=step.per_round, warmup=step.warmup
    )


def case3b(runner: Runner, plan: Plan) -> None:
    work = cases.timed(cases.save_one_row)
    results = _measure(runner, plan, "case 3b", cases.CASE3B, work)
    figures = summary.add_case("1 row, 10 handlers", results)
    print(
        "Each sample: `with atomic(): Item.objects.create(...)` with ten post_save receivers "
        f"of each kind; {plan.case3.rounds} rounds of {plan.case3.per_round} per variant.\n"
    )
    _print(results, figures)
    summary.add_target(
        "10.3 one row, ten handlers: ours / idiom",
        summary.ratio(figures, "deferred"),
        0.25,
        floor=summary.ratio(figures, "none"),
    )


def case4(runner: Runner, plan: Plan) -> None:
    item = Item.objects.create(name="saved ten times", quantity=0, price=cases.PRICE)
    work = cases.timed(lambda: cases.save_ten_times(item))
    problems_before = len(runner.problems)
    results = _measure(runner, plan, "case 4", cases.CASE4, work)
    figures = summary.add_case("1 row saved 10x", results)
    print(
        f"Each sample: `with atomic():` then {cases.SAVES} x `item.save()` of one row; "
        "deferred_signals with `coalesce=True`. Messages/txn are checked in the queue after "
        f"every batch; {plan.case3.rounds} rounds of {plan.case3.per_round} per variant.\n"
    )
    _print(results, figures)
    wrong = [p for p in runner.problems[problems_before:] if "coalesce" in p]
    print(
        "\n> coalesce=True: "
        + ("exactly one message per transaction of ten saves." if not wrong else "; ".join(wrong))
    )
    bare = summary.ratio(figures, "bare")
    if bare == bare:  # not NaN: Redis answered
        print(
            f"> One bare LPUSH at commit and nothing else: {bare:.2f}x the idiom, the lowest "
            "a request path that publishes after the commit reaches here"
            + (" (above the 0.35x target)." if bare > 0.35 else ".")
        )
    summary.add_target(
        "10.4 one row saved 10x, coalesce: ours / idiom",
        summary.ratio(figures, "deferred"),
        0.35,
        floor=summary.ratio(figures, "none"),
    )
    summary.add_target(
        "10.4 messages published for 10 saves (coalesce)",
        1.0 if not wrong else float("nan"),
        1,
        unit="message",
    )
