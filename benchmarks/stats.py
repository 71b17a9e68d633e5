"""Medians, p95s, ratios and plain-text tables.

Machines running this are noisy and shared, so the figures worth quoting are ratios taken
within one round (every variant measured back to back), summarised over rounds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile: an observed value, honest for small samples."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass
class Samples:
    """Timings of one variant, kept per round so ratios can be taken within a round."""

    rounds: list[list[float]] = field(default_factory=list)

    def add_round(self, values: list[float]) -> None:
        self.rounds.append(values)

    @property
    def all(self) -> list[float]:
        return [value for values in self.rounds for value in values]

    @property
    def median(self) -> float:
        return median(self.all)

    @property
    def p95(self) -> float:
        return p95(self.all)

    def ratio_to(self, other: Samples) -> Ratio:
        """This variant's median over ``other``'s, round by round."""
        per_round = [
            median(mine) / median(theirs)
            for mine, theirs in zip(self.rounds, other.rounds, strict=False)
            if mine and theirs and median(theirs) > 0
        ]
        return Ratio(per_round)

    def added_ratio_to(self, other: Samples, floor: Samples) -> Ratio:
        """What this variant adds over ``floor``, over what ``other`` adds, round by round:
        the part of the cost a library can change (a ratio of whole transactions can never
        go below floor / other)."""
        per_round = []
        for mine, theirs, base in zip(self.rounds, other.rounds, floor.rounds, strict=False):
            if not (mine and theirs and base):
                continue
            added = median(theirs) - median(base)
            if added > 0:
                per_round.append((median(mine) - median(base)) / added)
        return Ratio(per_round)


@dataclass
class Ratio:
    per_round: list[float]

    @property
    def value(self) -> float:
        return median(self.per_round)

    def __str__(self) -> str:
        if not self.per_round:
            return "-"
        low, high = min(self.per_round), max(self.per_round)
        return f"{times(self.value)} ({times(low)}-{times(high)})"


def times(ratio: float) -> str:
    """A ratio with the digits that matter: 12.3x, 1.18x, 0.007x."""
    if math.isnan(ratio):
        return "-"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3f}x"


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.3f}"


def us(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e6:.1f}"


def kib(size: float | None) -> str:
    return "-" if size is None else f"{size / 1024:,.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
    """A Markdown-compatible table: readable in a terminal, pasteable into a README.

    The first column is text; with ``numeric`` the others are right-aligned figures.
    """
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(cell).rjust(width) if index and numeric else str(cell).ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=False))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (width + 1) + (":" if index and numeric else "-")
            for index, width in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
