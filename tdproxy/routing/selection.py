"""Backend selection: smooth weighted round robin, precomputed.

Theory of operation
-------------------
Smooth weighted round robin (the nginx algorithm) keeps a running ``current`` score per backend;
each pick adds every backend's weight to its score, takes the backend with the highest score and
subtracts the total from it. The result is evenly spread: at 70/30 every 10 consecutive picks
hold exactly 7 and 3, at 50/50 the picks alternate strictly.

The sequence is periodic with period ``sum(weights) / gcd(weights)``. When that period is small
(the usual case: 50/50, 70/30, 1/99) the whole cycle is computed once when the selector is built,
and a pick is one list index and one increment. Large or coprime weights fall back to running the
algorithm per pick. Either way ``pick()`` never awaits and touches no I/O, so it needs no lock.

Invariants: weight-0 entries are never picked; a selector built from an empty list (or only
zero weights) has ``empty`` set and ``pick()`` returns ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import gcd
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_PRECOMPUTED_PERIOD = 4096


def smooth_wrr_sequence(weights: Sequence[int], length: int) -> list[int]:
    """The first ``length`` indices that smooth WRR picks for ``weights``."""
    total = sum(weights)
    current = [0] * len(weights)
    picks: list[int] = []
    for _ in range(length):
        best = -1
        for index, weight in enumerate(weights):
            if weight <= 0:
                continue
            current[index] += weight
            if best < 0 or current[index] > current[best]:
                best = index
        current[best] -= total
        picks.append(best)
    return picks


class WeightedSelector(Generic[T]):
    """Picks items in smooth weighted rotation."""

    __slots__ = ("_current", "_cycle", "_items", "_position", "_total", "_weights", "empty")

    def __init__(self, entries: Sequence[tuple[T, int]]) -> None:
        live = [(item, weight) for item, weight in entries if weight > 0]
        self._items = [item for item, _ in live]
        self._weights = [weight for _, weight in live]
        self._total = sum(self._weights)
        self.empty = not live
        self._position = 0
        self._current = [0] * len(live)
        self._cycle: list[T] | None = None
        if live:
            divisor = 0
            for weight in self._weights:
                divisor = gcd(divisor, weight)
            period = self._total // divisor
            if period <= MAX_PRECOMPUTED_PERIOD:
                reduced = [weight // divisor for weight in self._weights]
                self._cycle = [self._items[i] for i in smooth_wrr_sequence(reduced, period)]

    def pick(self) -> T | None:
        cycle = self._cycle
        if cycle is not None:
            position = self._position
            self._position = position + 1 if position + 1 < len(cycle) else 0
            return cycle[position]
        if self.empty:
            return None
        return self._pick_dynamic()

    def _pick_dynamic(self) -> T:
        current = self._current
        best = 0
        for index, weight in enumerate(self._weights):
            current[index] += weight
            if current[index] > current[best]:
                best = index
        current[best] -= self._total
        return self._items[best]

    @property
    def items(self) -> list[T]:
        return list(self._items)

    def __repr__(self) -> str:
        shares = ", ".join(
            f"{item!r}={weight}" for item, weight in zip(self._items, self._weights, strict=True)
        )
        return f"WeightedSelector({shares})"
