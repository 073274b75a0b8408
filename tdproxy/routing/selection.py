"""Backend selection: smooth weighted round robin, computed once per cycle.

Theory of operation
-------------------
Smooth weighted round robin (the nginx algorithm) keeps a running ``current`` score per backend;
each pick adds every backend's weight to its score, takes the backend with the highest score and
subtracts the total from it. The result is evenly spread: at 70/30 every 10 consecutive picks
hold exactly 7 and 3, at 50/50 the picks alternate strictly.

The sequence is periodic with period ``sum(weights) / gcd(weights)``. When that period is small
enough (the usual case: 50/50, 70/30, 1/99) the cycle is remembered as a list of indices, and a
pick is two list lookups and one increment. Building a selector computes at most
``BUILD_BUDGET`` score updates (backends x picks) of that cycle, so a table of many backends is
built quickly; the rest of the cycle is computed one step per pick until it is complete. Periods
beyond ``MAX_PRECOMPUTED_PERIOD`` run the algorithm per pick and remember nothing. Either way
``pick()`` never awaits and touches no I/O, so it needs no lock.

The rotation's state (position in the cycle, current scores) can be handed to a selector with
the same items and weights (:meth:`WeightedSelector.resume`), so a rebuilt routing table goes on
where the old one stopped instead of starting the cycle again. :meth:`WeightedSelector.peek`
answers "who would be next if these were not here" without moving the rotation: retries use it,
so a failing backend does not steal the next backend's turn.

Invariants: weight-0 entries are never picked; a selector built from an empty list (or only
zero weights) has ``empty`` set and ``pick()`` returns ``None``; ``position <= len(cycle)``,
and ``current`` holds the scores after ``len(cycle)`` picks (after every pick when nothing is
remembered).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from itertools import chain, islice
from math import gcd
from operator import add
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_PRECOMPUTED_PERIOD = 4096  # longest cycle remembered
BUILD_BUDGET = 16_384  # score updates (backends x picks) a selector's build may compute


def smooth_wrr_sequence(weights: Sequence[int], length: int) -> list[int]:
    """The first ``length`` indices that smooth WRR picks for ``weights`` (the reference)."""
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

    __slots__ = (
        "_current",
        "_cycle",
        "_items",
        "_period",
        "_position",
        "_reduced",
        "_remember",
        "_total",
        "_weights",
        "empty",
    )

    def __init__(self, entries: Sequence[tuple[T, int]]) -> None:
        live = [(item, weight) for item, weight in entries if weight > 0]
        self._items = [item for item, _ in live]
        divisor = 0
        for _, weight in live:
            divisor = gcd(divisor, weight)
        self._weights = [weight for _, weight in live]
        # Reduced weights give the same sequence as the configured ones, with smaller scores.
        self._reduced = [weight // divisor for weight in self._weights]
        self._total = sum(self._reduced)
        self._period = self._total
        self.empty = not live
        self._position = 0
        self._current = [0] * len(live)
        self._cycle: list[int] = []
        self._remember = bool(live) and self._period <= MAX_PRECOMPUTED_PERIOD
        if self._remember:
            steps = min(self._period, max(1, BUILD_BUDGET // len(live)))
            self._cycle = [self._step() for _ in range(steps)]

    def pick(self) -> T | None:
        position = self._position
        cycle = self._cycle
        if position < len(cycle):
            self._position = position + 1 if position + 1 < self._period else 0
            return self._items[cycle[position]]
        if self.empty:
            return None
        index = self._step()
        if self._remember:  # the cycle is not complete yet: extend it by this pick
            cycle.append(index)
            self._position = position + 1 if position + 1 < self._period else 0
        return self._items[index]

    def _step(self) -> int:
        """One pick of the algorithm on ``current`` (builtins, so many backends stay cheap)."""
        current = self._current = list(map(add, self._current, self._reduced))
        best = current.index(max(current))  # the first of equals, as in the reference
        current[best] -= self._total
        return best

    def peek(self, exclude: Collection[T]) -> T | None:
        """The item the rotation would give next if those in ``exclude`` were not in it, or
        None when every item is excluded. The rotation does not move."""
        cycle = self._cycle
        position = self._position
        ahead: Iterable[int] = islice(cycle, position, None)
        if len(cycle) == self._period:  # complete: what is ahead wraps around
            ahead = chain(ahead, islice(cycle, 0, position))
        items = self._items
        for index in ahead:  # within one period every item comes up
            if items[index] not in exclude:
                return items[index]
        # Beyond what is remembered: the next step of the algorithm over the others only.
        best = -1
        best_score = 0
        for index, (current, weight) in enumerate(zip(self._current, self._reduced, strict=True)):
            if items[index] in exclude:
                continue
            score = current + weight
            if best < 0 or score > best_score:
                best, best_score = index, score
        return items[best] if best >= 0 else None

    def resume(self, previous: WeightedSelector[T]) -> None:
        """Go on with ``previous``'s rotation (built from the same weights in the same order:
        the caller checks), so a rebuild does not start the cycle again."""
        if previous._weights != self._weights:
            return
        self._cycle = list(previous._cycle)
        self._position = previous._position
        self._current = list(previous._current)

    @property
    def items(self) -> list[T]:
        return list(self._items)

    def __repr__(self) -> str:
        shares = ", ".join(
            f"{item!r}={weight}" for item, weight in zip(self._items, self._weights, strict=True)
        )
        return f"WeightedSelector({shares})"
