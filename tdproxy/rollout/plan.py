"""The rollout's plan: which weights each step writes, and how long it takes at least and at most.

Pure: it reads a validated :class:`Config` and the command's arguments and returns a
:class:`Plan`, or raises :class:`RolloutError` saying what is wrong.

Weights: each step's weights add up to 100, so a weight reads as a percentage. ``to`` gets the
step's percentage; the ``from`` backends share the rest in the proportion of their weights before
the rollout (by the largest-remainder method, so the weights stay whole numbers that add up
exactly; equally when those weights were all 0). Backups are never touched. A non-backup backend
that is neither ``to`` nor ``from`` must have weight 0 (it keeps it): otherwise ``to``'s share
would not be the step's percentage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from tdproxy.config.model import Config

MAX_EXTENSIONS = 3  # a step short of traffic gets at most this many more intervals
FULL = 100


class RolloutError(Exception):
    """The arguments do not make a rollout of this config; the message says why."""


@dataclass(frozen=True)
class Step:
    number: int  # 1-based
    percent: int  # to's share, 1..100
    weights: dict[str, int]  # to and every from backend; they add up to 100


@dataclass(frozen=True)
class Plan:
    to: str
    sources: tuple[str, ...]  # the from backends, in config order
    steps: tuple[Step, ...]
    interval: float  # seconds per step
    original: dict[str, int]  # every backend's weight before the first step

    @property
    def shortest(self) -> float:
        """Seconds the steps take when none is extended."""
        return len(self.steps) * self.interval

    @property
    def longest(self) -> float:
        """Seconds the steps take when every one is extended as often as allowed."""
        return self.shortest * (1 + MAX_EXTENSIONS)


def parse_steps(text: str) -> tuple[int, ...]:
    """``"5,25,50,100"`` -> ``(5, 25, 50, 100)``: whole percentages, rising, ending at 100."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise RolloutError(f"--steps {text!r}: expected percentages such as 5,25,50,100")
    steps = []
    for part in parts:
        number = part.removesuffix("%")
        if not number.isascii() or not number.isdigit() or not 1 <= int(number) <= FULL:
            raise RolloutError(f"--steps: {part!r} is not a whole percentage from 1 to 100")
        steps.append(int(number))
    if any(later <= earlier for earlier, later in pairwise(steps)):
        raise RolloutError(f"--steps {text}: each step must be higher than the one before")
    if steps[-1] != FULL:
        raise RolloutError(
            f"--steps {text}: the last step must be 100 (the rollout ends with {steps[-1]}%)"
        )
    return tuple(steps)


def make_plan(
    config: Config,
    to: str,
    sources: Sequence[str],
    steps: Sequence[int],
    interval: float,
) -> Plan:
    """The plan for moving traffic to ``to`` from ``sources`` (empty: every other non-backup
    backend) in ``steps``."""
    backends = {backend.name: backend for backend in config.backends}
    if config.routing.method == "failover":
        raise RolloutError(
            "routing.method is failover, which ignores weights: a rollout needs round_robin "
            "or sticky"
        )
    for name in (to, *sources):
        if name not in backends:
            raise RolloutError(f"unknown backend {name!r} (the backends are {', '.join(backends)})")
        if backends[name].backup:
            raise RolloutError(f"backend {name} is a backup: it cannot take part in a rollout")
    if to in sources:
        raise RolloutError(f"backend {to} is both --to and --from")
    if len(set(sources)) != len(sources):
        raise RolloutError("a backend is given more than once with --from")
    main = [b.name for b in config.backends if not b.backup and b.name != to]
    chosen = set(sources) if sources else set(main)
    if not chosen:
        raise RolloutError(f"there is no other non-backup backend to move traffic from to {to}")
    original = {backend.name: backend.weight for backend in config.backends}
    for name in main:
        if name not in chosen and original[name] > 0:
            raise RolloutError(
                f"backend {name} (weight {original[name]}) is neither --to nor --from: add "
                f"--from {name}, or set its weight to 0 first"
            )
    ordered = tuple(name for name in main if name in chosen)
    planned = tuple(
        Step(number, percent, {to: percent, **split_rest(FULL - percent, ordered, original)})
        for number, percent in enumerate(steps, start=1)
    )
    return Plan(to, ordered, planned, interval, original)


def split_rest(rest: int, names: Sequence[str], weights: Mapping[str, int]) -> dict[str, int]:
    """``rest`` shared among ``names`` in proportion to ``weights`` (equally when those are all
    0), as whole numbers that add up to ``rest``: largest remainders first, then list order."""
    base = {name: weights[name] for name in names}
    total = sum(base.values())
    if total == 0:
        base = dict.fromkeys(names, 1)
        total = len(names)
    exact = {name: rest * base[name] / total for name in names}
    result = {name: int(exact[name]) for name in names}
    left = rest - sum(result.values())
    by_remainder = sorted(names, key=lambda name: -(exact[name] - result[name]))
    for name in by_remainder[:left]:
        result[name] += 1
    return result
