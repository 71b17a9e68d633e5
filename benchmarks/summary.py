"""The figures worth quoting, gathered from every case: ours / idiom, ours / floor, targets.

Each request-path case hands over its measured variants (keys ``none``, ``deferred``,
``outbox``, ``idiom``, ``delay_on_commit``); other cases hand over single figures. At the end
:func:`report` prints one table and :func:`chart` draws ``benchmarks/results.svg``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.cases import Measured
from benchmarks.stats import Ratio, ms, table, times

CHART = Path(__file__).with_name("results.svg")


@dataclass
class CaseFigures:
    """One request-path case: medians in seconds, ratios within rounds."""

    title: str
    medians: dict[str, float] = field(default_factory=dict)
    to_idiom: dict[str, Ratio] = field(default_factory=dict)
    to_floor: dict[str, Ratio] = field(default_factory=dict)
    #: (variant - floor) / (idiom - floor): what each adds to the transaction, compared.
    added_to_idiom: dict[str, Ratio] = field(default_factory=dict)


@dataclass
class Target:
    """One target of the issues: the figure measured, what it must be, and whether it is."""

    name: str
    measured: float
    limit: float
    at_most: bool = True  # False: at least
    unit: str = "x"
    #: For a ratio of whole transactions: the floor's (no receiver) in the same run, the
    #: lowest ratio any variant can reach.
    floor: float = math.nan

    @property
    def met(self) -> bool:
        if math.isnan(self.measured):
            return False
        return self.measured <= self.limit if self.at_most else self.measured >= self.limit

    def row(self) -> list[str]:
        shown = times(self.measured) if self.unit == "x" else f"{self.measured:,.0f} {self.unit}"
        unit = "x" if self.unit == "x" else f" {self.unit}"
        limit = f"{'<=' if self.at_most else '>='} {self.limit:g}{unit}"
        floor = "" if math.isnan(self.floor) else times(self.floor)
        return [self.name, shown, limit, "met" if self.met else "MISSED", floor]


CASES: list[CaseFigures] = []
TARGETS: list[Target] = []


def add_case(title: str, results: Sequence[Measured]) -> CaseFigures:
    found = {m.variant.key: m for m in results if not m.skipped}
    figures = CaseFigures(title)
    floor, idiom = found.get("none"), found.get("idiom")
    for key, measured in found.items():
        figures.medians[key] = measured.samples.median
        if idiom is not None:
            figures.to_idiom[key] = measured.samples.ratio_to(idiom.samples)
        if floor is not None:
            figures.to_floor[key] = measured.samples.ratio_to(floor.samples)
            if idiom is not None:
                figures.added_to_idiom[key] = measured.samples.added_ratio_to(
                    idiom.samples, floor.samples
                )
    CASES.append(figures)
    return figures


def add_target(
    name: str,
    measured: float,
    limit: float,
    *,
    at_most: bool = True,
    unit: str = "x",
    floor: float = math.nan,
) -> None:
    TARGETS.append(Target(name, measured, limit, at_most, unit, floor))


def ratio(figures: CaseFigures, key: str) -> float:
    found = figures.to_idiom.get(key)
    return found.value if found is not None else math.nan


def report() -> None:
    if CASES:
        print("\n## Summary: request path, ours / idiom and ours / floor\n")
        rows = []
        for case in CASES:
            for key, label in (
                ("deferred", "ours (on_commit)"),
                ("outbox", "ours (outbox)"),
                ("outbox_row_by_row", "ours (outbox, one INSERT per call)"),
                ("delay_on_commit", "delay_on_commit"),
            ):
                if key not in case.medians:
                    continue
                rows.append(
                    [
                        f"{case.title}: {label}",
                        ms(case.medians.get("none", math.nan)),
                        ms(case.medians[key]),
                        ms(case.medians.get("idiom", math.nan)),
                        str(case.to_idiom.get(key, "-")),
                        str(case.to_floor.get(key, "-")),
                        str(case.added_to_idiom.get(key, "-")),
                        str(case.to_idiom.get("none", "-")),
                    ]
                )
        headers = [
            "case: variant",
            "floor ms",
            "variant ms",
            "idiom ms",
            "/ idiom",
            "/ floor",
            "added / idiom's added",
            "floor / idiom",
        ]
        print(table(headers, rows))
        print(
            "\n(added / idiom's added: (variant - floor) / (idiom - floor) per round, what a"
            " library can change; floor / idiom: the lowest '/ idiom' any variant can reach.)"
        )
    if TARGETS:
        print("\n## Targets (issue 10: 1-7; issue 7: durable path)\n")
        headers = ["target", "measured", "required", "", "floor / idiom (the lowest reachable)"]
        print(table(headers, [t.row() for t in TARGETS]))


def chart(path: Path = CHART) -> Path | None:
    """One grouped bar chart: request-path cost per case, floor / ours / idiom side by side."""
    if not CASES:
        return None
    try:
        import matplotlib

        matplotlib.use("svg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib is not installed: no chart; `make bench` installs it)")
        return None
    series = [
        ("none", "floor (no receiver)", "#9e9e9e"),
        ("deferred", "deferred_signals (on_commit)", "#1f77b4"),
        ("outbox", "deferred_signals (outbox)", "#6baed6"),
        ("idiom", "on_commit(task.delay) idiom", "#d62728"),
        ("delay_on_commit", "delay_on_commit", "#ff9896"),
    ]
    cases = [case for case in CASES if "idiom" in case.medians]
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 3.8))
    axes = [axes] if len(cases) == 1 else list(axes)
    for ax, case in zip(axes, cases, strict=True):
        shown = [
            (label, case.medians[key] * 1e3, color)
            for key, label, color in series
            if key in case.medians
        ]
        ax.bar(range(len(shown)), [value for _, value, _ in shown], color=[c for *_, c in shown])
        ax.set_xticks([])
        ax.set_title(case.title, fontsize=9)
        ax.set_ylabel("ms per transaction", fontsize=8)
        ax.tick_params(labelsize=8)
        idiom = case.medians["idiom"] * 1e3
        for index, (_, value, _) in enumerate(shown):
            ax.text(index, value, f"{value / idiom:.2f}x", ha="center", va="bottom", fontsize=7)
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=color) for _, _, color in series]
    fig.legend(handles, [label for _, label, _ in series], loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(
        "Request path: one transaction, commit and publish included (x the idiom)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)
    return path
