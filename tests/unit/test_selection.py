"""Smooth weighted round robin: exact shares in every window, precomputed or dynamic."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from math import gcd
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdproxy.routing import selection
from tdproxy.routing.selection import (
    BUILD_BUDGET,
    MAX_PRECOMPUTED_PERIOD,
    WeightedSelector,
    smooth_wrr_sequence,
)


def picks(selector: WeightedSelector[str], count: int) -> list[str | None]:
    return [selector.pick() for _ in range(count)]


def period_of(weights: Sequence[int]) -> int:
    live = [w for w in weights if w > 0]
    divisor = 0
    for weight in live:
        divisor = gcd(divisor, weight)
    return sum(live) // divisor


def dynamic_selector(entries: Sequence[tuple[str, int]]) -> WeightedSelector[str]:
    """A selector forced onto the per-pick algorithm (no precomputed cycle)."""
    with mock.patch.object(selection, "MAX_PRECOMPUTED_PERIOD", 0):
        return WeightedSelector(entries)


def lazy_selector(entries: Sequence[tuple[str, int]]) -> WeightedSelector[str]:
    """A selector whose build computes one step: the rest of its cycle comes pick by pick."""
    with mock.patch.object(selection, "BUILD_BUDGET", 0):
        return WeightedSelector(entries)


def assert_every_window(sequence: list[str | None], size: int, expected: dict[str, int]) -> None:
    for start in range(len(sequence) - size + 1):
        window = Counter(sequence[start : start + size])
        assert window == expected, f"window starting at pick {start}: {window}"


# -- the shares ------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1, 10, 7])
def test_70_30_gives_7_and_3_in_every_window_of_10(scale: int) -> None:
    selector = WeightedSelector([("a", 7 * scale), ("b", 3 * scale)])
    assert_every_window(picks(selector, 1000), 10, {"a": 7, "b": 3})


def test_70_30_is_spread_not_bunched() -> None:
    sequence = picks(WeightedSelector([("a", 70), ("b", 30)]), 100)
    # Never three b's within any 3 picks, and never more than 3 a's in a row.
    text = "".join(str(p) for p in sequence)
    assert "bb" not in text
    assert "aaaa" not in text


@pytest.mark.parametrize("weights", [(50, 50), (1, 1), (1000, 1000)])
def test_equal_weights_strictly_alternate(weights: tuple[int, int]) -> None:
    sequence = picks(WeightedSelector([("a", weights[0]), ("b", weights[1])]), 1001)
    assert sequence[0] == "a"
    for previous, current in pairwise(sequence):
        assert previous != current


def test_1_99_gives_exactly_one_in_every_window_of_100() -> None:
    sequence = picks(WeightedSelector([("canary", 1), ("main", 99)]), 1000)
    assert_every_window(sequence, 100, {"canary": 1, "main": 99})


def test_three_backends_5_3_2_exact_in_every_period() -> None:
    sequence = picks(WeightedSelector([("a", 5), ("b", 3), ("c", 2)]), 500)
    assert_every_window(sequence, 10, {"a": 5, "b": 3, "c": 2})


def test_three_backends_50_30_20_exact_in_every_window_of_10() -> None:
    sequence = picks(WeightedSelector([("a", 50), ("b", 30), ("c", 20)]), 500)
    assert_every_window(sequence, 10, {"a": 5, "b": 3, "c": 2})


def test_single_backend_gets_everything() -> None:
    assert picks(WeightedSelector([("only", 42)]), 10) == ["only"] * 10


def test_first_pick_goes_to_the_heaviest() -> None:
    assert WeightedSelector([("light", 1), ("heavy", 9)]).pick() == "heavy"


def test_matches_nginx_reference_sequence() -> None:
    # nginx's documented example: weights 5, 1, 1 -> a a b a c a a.
    sequence = picks(WeightedSelector([("a", 5), ("b", 1), ("c", 1)]), 7)
    assert sequence == ["a", "a", "b", "a", "c", "a", "a"]


# -- zero weights and empty selectors --------------------------------------------------------


def test_weight_zero_is_never_picked() -> None:
    selector = WeightedSelector([("a", 3), ("off", 0), ("b", 1)])
    sequence = picks(selector, 400)
    assert "off" not in sequence
    assert_every_window(sequence, 4, {"a": 3, "b": 1})
    assert selector.items == ["a", "b"]


def test_weight_zero_never_picked_on_the_dynamic_path() -> None:
    selector = dynamic_selector([("off", 0), ("a", 3), ("b", 1)])
    assert "off" not in picks(selector, 400)


@pytest.mark.parametrize("entries", [[], [("a", 0)], [("a", 0), ("b", 0)]])
def test_empty_or_all_zero_is_empty(entries: list[tuple[str, int]]) -> None:
    selector = WeightedSelector(entries)
    assert selector.empty
    assert selector.items == []
    assert picks(selector, 3) == [None, None, None]


def test_all_zero_is_empty_on_the_dynamic_path_too() -> None:
    selector = dynamic_selector([("a", 0)])
    assert selector.empty
    assert selector.pick() is None


def test_non_empty_selector_is_not_empty() -> None:
    assert not WeightedSelector([("a", 1)]).empty


def test_negative_weights_are_treated_as_zero() -> None:
    selector = WeightedSelector([("a", -5), ("b", 1)])
    assert picks(selector, 5) == ["b"] * 5


def test_items_is_a_copy() -> None:
    selector = WeightedSelector([("a", 1), ("b", 1)])
    selector.items.append("c")
    assert selector.items == ["a", "b"]


def test_repr_shows_weights() -> None:
    assert repr(WeightedSelector([("a", 70), ("b", 30)])) == "WeightedSelector('a'=70, 'b'=30)"


def test_items_may_be_any_object() -> None:
    first, second = object(), object()
    selector: WeightedSelector[object] = WeightedSelector([(first, 1), (second, 1)])
    assert [selector.pick() for _ in range(4)] == [first, second, first, second]


# -- large weights: the dynamic path ---------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [(4999, 5001), (997, 1009, 4093), (1, 99_999), (12345, 6789, 1)],
)
def test_large_coprime_weights_are_exact_over_one_period(weights: tuple[int, ...]) -> None:
    period = period_of(weights)
    assert period > MAX_PRECOMPUTED_PERIOD  # really the dynamic path
    names = [f"b{i}" for i in range(len(weights))]
    selector = WeightedSelector(list(zip(names, weights, strict=True)))
    sequence = picks(selector, period)
    assert Counter(sequence) == dict(zip(names, weights, strict=True))
    expected = [names[i] for i in smooth_wrr_sequence(weights, period)]
    assert sequence == expected


def test_dynamic_path_repeats_with_its_period() -> None:
    weights = (4999, 5001)
    selector = WeightedSelector([("a", weights[0]), ("b", weights[1])])
    period = period_of(weights)
    first = picks(selector, period)
    second = picks(selector, period)
    assert first == second


def test_dynamic_path_is_smoothly_spread() -> None:
    # 4999/5001: nearly 50/50, so no backend ever gets three picks in a row.
    selector = WeightedSelector([("a", 4999), ("b", 5001)])
    text = "".join(str(p) for p in picks(selector, 20_000))
    assert "aaa" not in text
    assert "bbb" not in text


def test_boundary_period_is_precomputed_and_exact() -> None:
    weights = (MAX_PRECOMPUTED_PERIOD - 1, 1)
    selector = WeightedSelector([("a", weights[0]), ("b", weights[1])])
    sequence = picks(selector, 2 * MAX_PRECOMPUTED_PERIOD)
    assert Counter(sequence) == {"a": 2 * weights[0], "b": 2}


# -- building is bounded ---------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1] * 1000, [(i % 7) + 1 for i in range(1000)]])
def test_building_a_selector_computes_a_bounded_number_of_steps(weights: list[int]) -> None:
    # 1,000 backends: the whole cycle would be 1,000 (or ~4,000) picks x 1,000 score updates.
    steps = 0
    step = WeightedSelector._step

    def counted(self: WeightedSelector[str]) -> int:
        nonlocal steps
        steps += 1
        return step(self)

    names = [f"b{i}" for i in range(len(weights))]
    with mock.patch.object(WeightedSelector, "_step", counted):
        selector = WeightedSelector(list(zip(names, weights, strict=True)))
    assert steps * len(weights) <= BUILD_BUDGET
    # The rest of the cycle comes pick by pick, and is the reference sequence.
    period = period_of(weights)
    expected = [names[i] for i in smooth_wrr_sequence(weights, period)]
    assert picks(selector, period) == expected
    assert picks(selector, period) == expected


# -- peek: a retry's choice, without moving the rotation --------------------------------------


@pytest.mark.parametrize("make", [WeightedSelector, dynamic_selector, lazy_selector])
def test_peek_does_not_move_the_rotation(make: Any) -> None:
    entries = [("a", 5), ("b", 3), ("c", 2)]
    undisturbed = picks(make(entries), 100)
    selector = make(entries)
    sequence = []
    for _ in range(100):
        sequence.append(selector.pick())
        selector.peek({"a"})
        selector.peek({"a", "b"})
        selector.peek(set())
    assert sequence == undisturbed


@pytest.mark.parametrize("make", [WeightedSelector, lazy_selector])
def test_peek_names_the_next_one_not_excluded(make: Any) -> None:
    entries = [("a", 5), ("b", 3), ("c", 2)]
    reference = picks(WeightedSelector(entries), 20)
    selector = make(entries)
    for index in range(10):
        assert selector.peek(set()) == reference[index]
        picked = selector.pick()
        assert picked == reference[index]
        following = next(p for p in reference[index + 1 :] if p != picked)
        assert selector.peek({picked}) == following


@pytest.mark.parametrize("make", [WeightedSelector, dynamic_selector, lazy_selector])
def test_peek_never_returns_an_excluded_item(make: Any) -> None:
    selector = make([("heavy", 999), ("light", 1), ("other", 1)])
    for _ in range(50):
        selector.pick()
        assert selector.peek({"heavy"}) in ("light", "other")
        assert selector.peek({"heavy", "light"}) == "other"
        assert selector.peek({"heavy", "light", "other"}) is None


def test_peek_on_an_empty_selector() -> None:
    assert WeightedSelector([]).peek(set()) is None


# -- resume: a rebuilt selector goes on with the rotation -------------------------------------


@pytest.mark.parametrize("make", [WeightedSelector, dynamic_selector, lazy_selector])
@pytest.mark.parametrize("weights", [(7, 3), (99, 1), (5, 3, 2), (4999, 5001)])
def test_resume_goes_on_where_the_previous_selector_stopped(
    make: Any, weights: tuple[int, ...]
) -> None:
    names = [f"b{i}" for i in range(len(weights))]
    entries = list(zip(names, weights, strict=True))
    reference = [names[i] for i in smooth_wrr_sequence(weights, 300)]
    selector = make(entries)
    sequence: list[str | None] = []
    for chunk in (13, 40, 1, 99, 147):
        sequence += picks(selector, chunk)
        rebuilt = make(entries)
        rebuilt.resume(selector)
        selector = rebuilt
    assert sequence == reference


def test_resume_ignores_a_selector_with_other_weights() -> None:
    old = WeightedSelector([("a", 7), ("b", 3)])
    picks(old, 5)
    new = WeightedSelector([("a", 1), ("b", 1)])
    new.resume(old)
    assert picks(new, 4) == ["a", "b", "a", "b"]


# -- smooth_wrr_sequence ---------------------------------------------------------------------


def test_smooth_wrr_sequence_indices() -> None:
    assert smooth_wrr_sequence([7, 3], 10) == [0, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    assert smooth_wrr_sequence([1, 1], 4) == [0, 1, 0, 1]
    assert smooth_wrr_sequence([0, 2], 3) == [1, 1, 1]
    assert smooth_wrr_sequence([3], 0) == []


# -- precomputed and dynamic agree (property) ------------------------------------------------

weight_lists = st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=6).filter(
    lambda ws: any(w > 0 for w in ws)
)


@settings(max_examples=300, deadline=None)
@given(weights=weight_lists, extra=st.integers(min_value=0, max_value=50))
def test_precomputed_and_dynamic_pick_the_same_sequence(weights: list[int], extra: int) -> None:
    names = [f"b{i}" for i in range(len(weights))]
    entries = list(zip(names, weights, strict=True))
    count = 2 * period_of(weights) + extra
    precomputed = picks(WeightedSelector(entries), count)
    dynamic = picks(dynamic_selector(entries), count)
    lazy = picks(lazy_selector(entries), count)
    reference = [names[i] for i in smooth_wrr_sequence(weights, count)]
    assert precomputed == reference
    assert dynamic == reference
    assert lazy == reference


@settings(max_examples=300, deadline=None)
@given(weights=weight_lists)
def test_every_window_of_one_period_holds_the_exact_shares(weights: list[int]) -> None:
    names = [f"b{i}" for i in range(len(weights))]
    period = period_of(weights)
    divisor = sum(w for w in weights if w > 0) // period
    expected = {name: w // divisor for name, w in zip(names, weights, strict=True) if w > 0}
    sequence = picks(WeightedSelector(list(zip(names, weights, strict=True))), 3 * period)
    for start in range(0, 2 * period + 1):
        assert Counter(sequence[start : start + period]) == expected


@settings(max_examples=200, deadline=None)
@given(
    a=st.integers(min_value=1, max_value=500),
    b=st.integers(min_value=1, max_value=500),
    count=st.integers(min_value=1, max_value=1000),
)
def test_two_backends_never_drift_more_than_half_a_pick(a: int, b: int, count: int) -> None:
    # With two backends smooth WRR is as even as possible: after n picks each backend's count
    # is n * weight / total rounded (off by at most 0.5), so a 70/30 split never bunches up.
    sequence = picks(WeightedSelector([("a", a), ("b", b)]), count)
    assert abs(sequence.count("a") - count * a / (a + b)) <= 0.5 + 1e-9
