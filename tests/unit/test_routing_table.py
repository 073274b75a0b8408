"""The routing table and Router: methods, health, backups, sticky, overrides and reloads."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from itertools import pairwise
from typing import Any

import pytest

from tdproxy.config import Config, parse_config
from tdproxy.dataplane.endpoints import endpoint_key
from tdproxy.dataplane.pool import UpstreamPool
from tdproxy.dataplane.upstream import UpstreamConnection
from tdproxy.routing.router import Router
from tdproxy.routing.state import BackendState
from tdproxy.routing.table import RoutingTable, Target
from tests.fakes.routing import new_router
from tests.fakes.sansio import FakeTransport


def make_config(
    method: str = "round_robin", backends: list[dict[str, Any]] | None = None, **routing: Any
) -> Config:
    if backends is None:
        backends = [
            {"name": "blue", "url": "http://blue.internal", "weight": 70},
            {"name": "green", "url": "http://green.internal", "weight": 30},
        ]
    routing_section: dict[str, Any] = {"method": method, **routing}
    return parse_config({"routing": routing_section, "backends": backends})


def weighted(*spec: tuple[str, int], backup: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [
        {"name": name, "url": f"http://{name}.internal", "weight": weight, "backup": name in backup}
        for name, weight in spec
    ]


def names(table: RoutingTable, count: int, **kwargs: Any) -> list[str | None]:
    result: list[str | None] = []
    for _ in range(count):
        target = table.pick(**kwargs)
        result.append(None if target is None else target.name)
    return result


def set_health(router: Router, **health: bool) -> None:
    for name, healthy in health.items():
        router.states[name].set_health(healthy, "test")
    router.refresh()


def cookie_for(target: Target, cookie: str = "TDSESSION") -> bytes:
    """The Cookie request header a browser sends back after ``target``'s Set-Cookie."""
    line = target.set_cookie.decode("latin-1")
    pair = line.removeprefix("Set-Cookie: ").split(";")[0]
    assert pair.startswith(cookie + "=")
    return pair.encode("latin-1")


def assert_every_window(sequence: list[str | None], size: int, expected: dict[str, int]) -> None:
    for start in range(len(sequence) - size + 1):
        assert Counter(sequence[start : start + size]) == expected, f"window at {start}"


def fake_connection() -> UpstreamConnection:
    """A real upstream connection on a fake transport (the compiled build checks types):
    usable until closed."""
    connection = UpstreamConnection(UpstreamPool(("test",)))
    connection.connection_made(FakeTransport(connection))  # type: ignore[arg-type]
    return connection


# -- round robin -----------------------------------------------------------------------------


def test_round_robin_70_30_in_every_window_of_10() -> None:
    router = new_router(make_config())
    assert_every_window(names(router.table, 500), 10, {"blue": 7, "green": 3})


def test_round_robin_50_50_alternates() -> None:
    router = new_router(make_config(backends=weighted(("blue", 50), ("green", 50))))
    sequence = names(router.table, 100)
    assert all(a != b for a, b in pairwise(sequence))


def test_round_robin_keeps_relative_weights_when_one_is_down() -> None:
    router = new_router(make_config(backends=weighted(("a", 50), ("b", 30), ("c", 20))))
    assert_every_window(names(router.table, 200), 10, {"a": 5, "b": 3, "c": 2})
    set_health(router, a=False)
    assert_every_window(names(router.table, 200), 5, {"b": 3, "c": 2})
    assert [t.name for t in router.table.eligible()] == ["b", "c"]
    set_health(router, a=True)
    assert_every_window(names(router.table, 200), 10, {"a": 5, "b": 3, "c": 2})


def test_round_robin_unhealthy_gets_nothing() -> None:
    router = new_router(make_config())
    set_health(router, green=False)
    assert set(names(router.table, 50)) == {"blue"}
    assert not router.table.all_down


def test_weight_zero_backend_gets_nothing() -> None:
    router = new_router(make_config(backends=weighted(("blue", 1), ("dark", 0))))
    assert set(names(router.table, 50)) == {"blue"}


def test_health_change_needs_refresh() -> None:
    # The selector is rebuilt on refresh(), so the hot path never filters dead backends.
    router = new_router(make_config())
    router.states["green"].set_health(False, "test")
    assert "green" in names(router.table, 10)
    router.refresh()
    assert "green" not in names(router.table, 10)


def flip_every(router: Router, name: str, every: int, picks: int) -> list[str | None]:
    """``picks`` picks, with backend ``name`` flipping health (and a refresh) every ``every``."""
    sequence: list[str | None] = []
    for index in range(picks):
        if index and index % every == 0:
            state = router.states[name]
            set_health(router, **{name: not state.healthy})
        sequence.extend(names(router.table, 1))
    return sequence


def test_a_backup_flipping_does_not_restart_the_99_1_rotation() -> None:
    spec = weighted(("main", 99), ("canary", 1), ("spare", 1), backup=("spare",))
    router = new_router(make_config(backends=spec))
    sequence = flip_every(router, "spare", 40, 10_000)
    assert Counter(sequence) == {"main": 9_900, "canary": 100}
    assert_every_window(sequence, 100, {"main": 99, "canary": 1})


def test_a_backup_flipping_keeps_7_and_3_in_every_window_of_10() -> None:
    spec = weighted(("blue", 70), ("green", 30), ("spare", 5), backup=("spare",))
    router = new_router(make_config(backends=spec))
    sequence = flip_every(router, "spare", 7, 1_000)
    assert_every_window(sequence, 10, {"blue": 7, "green": 3})


def test_a_drained_backend_flipping_does_not_restart_the_rotation() -> None:
    spec = weighted(("blue", 70), ("green", 30), ("drained", 0))
    router = new_router(make_config(backends=spec))
    sequence = flip_every(router, "drained", 4, 1_000)
    assert_every_window(sequence, 10, {"blue": 7, "green": 3})


def test_a_reload_with_the_same_weights_goes_on_with_the_rotation() -> None:
    config = make_config()
    router = new_router(config)
    sequence: list[str | None] = []
    for index in range(100):
        # Reloads that change nothing, or only something outside the rotation.
        if index % 2:
            router.apply(config)
        else:
            router.apply(make_config(when_all_down="reject"))
        sequence.extend(names(router.table, 9))
    assert_every_window(sequence, 10, {"blue": 7, "green": 3})


def test_a_reload_that_changes_the_weights_starts_the_new_rotation() -> None:
    router = new_router(make_config())
    names(router.table, 3)
    router.apply(make_config(backends=weighted(("blue", 50), ("green", 50))))
    assert names(router.table, 4) == ["blue", "green", "blue", "green"]


def test_an_eligible_backend_flipping_still_rebuilds_the_rotation() -> None:
    router = new_router(make_config(backends=weighted(("a", 50), ("b", 30), ("c", 20))))
    set_health(router, c=False)
    assert_every_window(names(router.table, 80), 8, {"a": 5, "b": 3})


# -- backups ---------------------------------------------------------------------------------


def backup_router(**routing: Any) -> Router:
    spec = weighted(("blue", 70), ("green", 30), ("spare", 5), backup=("spare",))
    return new_router(make_config(backends=spec, **routing))


def test_backup_idle_while_a_non_backup_is_healthy() -> None:
    router = backup_router()
    assert "spare" not in names(router.table, 200)
    set_health(router, blue=False)
    assert set(names(router.table, 50)) == {"green"}


def test_backup_serves_only_while_no_non_backup_is_healthy() -> None:
    router = backup_router()
    set_health(router, blue=False, green=False)
    assert set(names(router.table, 50)) == {"spare"}
    assert not router.table.all_down
    set_health(router, green=True)
    assert set(names(router.table, 50)) == {"green"}


def test_several_backups_share_by_weight() -> None:
    spec = weighted(("main", 1), ("b1", 3), ("b2", 1), backup=("b1", "b2"))
    router = new_router(make_config(backends=spec))
    set_health(router, main=False)
    assert_every_window(names(router.table, 100), 4, {"b1": 3, "b2": 1})


def test_zero_weight_backups_share_equally() -> None:
    spec = weighted(("main", 1), ("b1", 0), ("b2", 0), backup=("b1", "b2"))
    router = new_router(make_config(backends=spec))
    set_health(router, main=False)
    assert_every_window(names(router.table, 100), 2, {"b1": 1, "b2": 1})


# -- all down --------------------------------------------------------------------------------


def test_all_down_fail_open_tries_the_weighted_backends() -> None:
    router = backup_router()
    set_health(router, blue=False, green=False, spare=False)
    assert router.table.all_down
    assert_every_window(names(router.table, 100), 10, {"blue": 7, "green": 3})


def test_all_down_reject_picks_nothing() -> None:
    router = backup_router(when_all_down="reject")
    set_health(router, blue=False, green=False, spare=False)
    assert router.table.all_down
    assert router.table.pick() is None
    assert router.table.eligible() == []
    assert router.table.alternative([]) is None


def test_reject_recovers_when_a_backend_comes_back() -> None:
    router = new_router(make_config(when_all_down="reject"))
    set_health(router, blue=False, green=False)
    assert router.table.pick() is None
    set_health(router, green=True)
    assert set(names(router.table, 10)) == {"green"}
    assert not router.table.all_down


def test_initial_health_is_asked_per_backend() -> None:
    router = new_router(make_config(when_all_down="reject"), initial_health=lambda b: False)
    assert router.table.all_down
    assert router.table.pick() is None
    assert not router.states["blue"].healthy


# -- failover --------------------------------------------------------------------------------


def failover_router(**routing: Any) -> Router:
    spec = weighted(("primary", 1), ("secondary", 1), ("spare", 1), backup=("spare",))
    return new_router(make_config("failover", spec, **routing))


def test_failover_sends_everything_to_the_first_healthy_in_order() -> None:
    router = failover_router()
    assert set(names(router.table, 20)) == {"primary"}


def test_failover_walks_the_list_then_the_backups_then_returns() -> None:
    router = failover_router()
    set_health(router, primary=False)
    assert set(names(router.table, 20)) == {"secondary"}
    set_health(router, secondary=False)
    assert set(names(router.table, 20)) == {"spare"}
    set_health(router, secondary=True)
    assert set(names(router.table, 20)) == {"secondary"}
    set_health(router, primary=True)
    assert set(names(router.table, 20)) == {"primary"}


def test_failover_ignores_weights() -> None:
    spec = weighted(("primary", 0), ("secondary", 100))
    router = new_router(make_config("failover", spec))
    assert set(names(router.table, 20)) == {"primary"}


def test_failover_prefers_a_later_non_backup_over_an_earlier_backup() -> None:
    spec = weighted(("spare", 1), ("primary", 1), backup=("spare",))
    router = new_router(make_config("failover", spec))
    assert set(names(router.table, 10)) == {"primary"}


def test_failover_all_down_fail_open_tries_the_primary() -> None:
    router = failover_router()
    set_health(router, primary=False, secondary=False, spare=False)
    assert router.table.all_down
    assert set(names(router.table, 10)) == {"primary"}


def test_failover_all_down_reject() -> None:
    router = failover_router(when_all_down="reject")
    set_health(router, primary=False, secondary=False, spare=False)
    assert router.table.pick() is None


# -- sticky ----------------------------------------------------------------------------------


def sticky_router(**routing: Any) -> Router:
    return new_router(make_config("sticky", **routing))


def test_sticky_new_user_placed_by_weight() -> None:
    router = sticky_router()
    assert_every_window(names(router.table, 200), 10, {"blue": 7, "green": 3})
    assert_every_window(names(router.table, 200, cookie=b"other=1"), 10, {"blue": 7, "green": 3})


def test_sticky_cookie_pins_whatever_the_weights() -> None:
    router = sticky_router()
    green = cookie_for(router.table.by_name["green"])
    assert set(names(router.table, 50, cookie=green)) == {"green"}
    assert set(names(router.table, 50, cookie=b"a=1; " + green + b"; b=2")) == {"green"}


def test_sticky_pin_survives_a_reload_to_weight_zero() -> None:
    router = sticky_router()
    green = cookie_for(router.table.by_name["green"])
    router.apply(make_config("sticky", weighted(("blue", 100), ("green", 0))))
    assert set(names(router.table, 50, cookie=green)) == {"green"}
    assert set(names(router.table, 50)) == {"blue"}
    assert set(names(router.table, 50, cookie=b"TDSESSION=junk")) == {"blue"}


def test_sticky_unhealthy_pinned_backend_re_places_the_user() -> None:
    router = sticky_router()
    green_target = router.table.by_name["green"]
    green = cookie_for(green_target)
    set_health(router, green=False)
    assert set(names(router.table, 20, cookie=green)) == {"blue"}
    # The re-placed user is handed blue's cookie by the data plane and stays there.
    blue = cookie_for(router.table.by_name["blue"])
    set_health(router, green=True)
    assert set(names(router.table, 20, cookie=blue)) == {"blue"}
    assert set(names(router.table, 20, cookie=green)) == {"green"}


def test_sticky_removed_backend_re_places_the_user() -> None:
    router = sticky_router()
    green = cookie_for(router.table.by_name["green"])
    router.apply(make_config("sticky", weighted(("blue", 1))))
    assert set(names(router.table, 20, cookie=green)) == {"blue"}


@pytest.mark.parametrize(
    "cookie",
    [b"TDSESSION=garbage", b"TDSESSION=", b'TDSESSION=""', b"TDSESSION", b"tdsession=x", b""],
)
def test_sticky_unknown_cookie_is_placed_by_weight(cookie: bytes) -> None:
    router = sticky_router()
    assert_every_window(names(router.table, 100, cookie=cookie), 10, {"blue": 7, "green": 3})


def test_sticky_backup_pin_released_when_a_primary_returns() -> None:
    spec = weighted(("blue", 1), ("spare", 1), backup=("spare",))
    router = new_router(make_config("sticky", spec))
    set_health(router, blue=False)
    spare = cookie_for(router.table.by_name["spare"])
    assert set(names(router.table, 10, cookie=spare)) == {"spare"}
    set_health(router, blue=True)
    assert set(names(router.table, 10, cookie=spare)) == {"blue"}


def test_sticky_all_down_fail_open_keeps_the_pin() -> None:
    router = sticky_router()
    green = cookie_for(router.table.by_name["green"])
    set_health(router, blue=False, green=False)
    assert set(names(router.table, 10, cookie=green)) == {"green"}


def test_sticky_all_down_reject_refuses_even_pinned_users() -> None:
    router = sticky_router(when_all_down="reject")
    green = cookie_for(router.table.by_name["green"])
    set_health(router, blue=False, green=False)
    assert router.table.pick(cookie=green) is None


def test_sticky_cookie_ignored_under_round_robin() -> None:
    router = new_router(make_config())
    green = cookie_for(router.table.by_name["green"])
    assert_every_window(names(router.table, 100, cookie=green), 10, {"blue": 7, "green": 3})


def test_sticky_custom_cookie_name_and_secret() -> None:
    router = sticky_router(sticky={"cookie": "pin", "secret": "s3cret"})
    green = cookie_for(router.table.by_name["green"], cookie="pin")
    assert set(names(router.table, 20, cookie=green)) == {"green"}
    unsigned = new_router(make_config("sticky", sticky={"cookie": "pin"}))
    forged = cookie_for(unsigned.table.by_name["green"], cookie="pin")
    assert forged != green
    assert_every_window(names(router.table, 100, cookie=forged), 10, {"blue": 7, "green": 3})


def test_sticky_tokens_agree_between_replicas() -> None:
    first, second = sticky_router(), sticky_router()
    green = cookie_for(first.table.by_name["green"])
    assert set(names(second.table, 10, cookie=green)) == {"green"}


def test_set_cookie_lines() -> None:
    router = new_router(make_config("sticky", sticky={"max_age": "1h"}), secure_cookie=True)
    line = router.table.by_name["blue"].set_cookie
    assert line.startswith(b"Set-Cookie: TDSESSION=")
    assert line.endswith(b"; Path=/; HttpOnly; SameSite=Lax; Secure; Max-Age=3600\r\n")
    plain = new_router(make_config("sticky")).table.by_name["blue"].set_cookie
    assert plain.endswith(b"; Path=/; HttpOnly; SameSite=Lax\r\n")


# -- overrides -------------------------------------------------------------------------------


def override_router(method: str = "sticky", **routing: Any) -> Router:
    spec = weighted(("blue", 1), ("green", 1), ("dark", 0))
    return new_router(make_config(method, spec, **routing))


def test_overrides_off_by_default() -> None:
    router = override_router()
    table = router.table
    assert table.override_header is None
    dark = names(table, 40, override=b"dark", cookie=b"X-TD-Backend=dark; td_backend=dark")
    assert "dark" not in dark


def test_override_header_sends_the_request_to_the_named_backend() -> None:
    router = override_router(override_header="X-TD-Backend")
    assert router.table.override_header == b"x-td-backend"
    assert set(names(router.table, 10, override=b"dark")) == {"dark"}
    assert set(names(router.table, 10, override=b"  green ")) == {"green"}


def test_override_header_with_unknown_name_falls_back() -> None:
    router = override_router("round_robin", override_header="X-TD-Backend")
    sequence = names(router.table, 20, override=b"nope")
    assert_every_window(sequence, 2, {"blue": 1, "green": 1})


def test_override_cookie_sends_the_request_to_the_named_backend() -> None:
    router = override_router(override_cookie="td_backend")
    assert set(names(router.table, 10, cookie=b"x=1; td_backend=dark")) == {"dark"}
    sequence = names(router.table, 20, cookie=b"td_backend=nope")
    assert_every_window(sequence, 2, {"blue": 1, "green": 1})


def test_override_beats_sticky_beats_weight() -> None:
    router = override_router(override_header="X-TD-Backend", override_cookie="td_backend")
    table = router.table
    pinned_blue = cookie_for(table.by_name["blue"])
    # sticky > weight
    assert set(names(table, 10, cookie=pinned_blue)) == {"blue"}
    # override cookie > sticky
    both = pinned_blue + b"; td_backend=green"
    assert set(names(table, 10, cookie=both)) == {"green"}
    # override header > override cookie > sticky
    assert set(names(table, 10, cookie=both, override=b"dark")) == {"dark"}
    # an unknown override header name falls back to the override cookie
    assert set(names(table, 10, cookie=both, override=b"nope")) == {"green"}


# -- alternative -----------------------------------------------------------------------------


def test_alternative_never_returns_an_excluded_target() -> None:
    router = new_router(make_config(backends=weighted(("a", 5), ("b", 3), ("c", 2))))
    table = router.table
    a, b, c = (table.by_name[n] for n in "abc")
    for _ in range(50):
        assert table.alternative([a]) in (b, c)
        assert table.alternative([a, b]) is c
        assert table.alternative([b, c]) is a
    assert table.alternative([a, b, c]) is None


def test_alternative_returns_none_when_only_one_is_eligible() -> None:
    router = new_router(make_config())
    set_health(router, green=False)
    table = router.table
    assert table.alternative([table.by_name["blue"]]) is None
    assert table.alternative([]) is table.by_name["blue"]


def test_alternative_skips_ineligible_targets() -> None:
    router = new_router(make_config(backends=weighted(("a", 1), ("b", 1), ("off", 0))))
    table = router.table
    for _ in range(10):
        assert table.alternative([table.by_name["a"]]) is table.by_name["b"]
    assert table.alternative([table.by_name["a"], table.by_name["b"]]) is None


def test_alternative_with_heavily_skewed_weights_still_finds_the_other() -> None:
    router = new_router(make_config(backends=weighted(("heavy", 999), ("light", 1))))
    table = router.table
    for _ in range(20):
        assert table.alternative([table.by_name["heavy"]]) is table.by_name["light"]


def test_a_retry_does_not_move_the_rotation() -> None:
    # 50/50 and "broken" fails every request it gets: each failure is retried on the other
    # one, and the next request still starts where the rotation says (10 first tries each).
    router = new_router(make_config(backends=weighted(("broken", 50), ("good", 50))))
    table = router.table
    first_tries: list[str] = []
    for _ in range(20):
        target = table.pick()
        assert target is not None
        first_tries.append(target.name)
        if target.name == "broken":
            assert table.alternative([target]) is table.by_name["good"]
    assert Counter(first_tries) == {"broken": 10, "good": 10}
    assert all(a != b for a, b in pairwise(first_tries))


def test_retries_leave_the_70_30_sequence_as_it_was() -> None:
    spec = weighted(("a", 70), ("b", 30))
    undisturbed = names(new_router(make_config(backends=spec)).table, 200)
    table = new_router(make_config(backends=spec)).table
    sequence = []
    for _ in range(200):
        target = table.pick()
        assert target is not None
        sequence.append(target.name)
        table.alternative([target])  # every request retried once: the rotation does not see it
    assert sequence == undisturbed


def test_a_retry_goes_to_whoever_is_next_in_the_rotation() -> None:
    spec = weighted(("a", 2), ("b", 1), ("c", 1))
    table = new_router(make_config(backends=spec)).table
    sequence = names(new_router(make_config(backends=spec)).table, 16)  # two periods
    for index in range(8):
        target = table.pick()
        assert target is not None and target.name == sequence[index]
        following = next(n for n in sequence[index + 1 :] if n != target.name)
        alternative = table.alternative([target])
        assert alternative is not None and alternative.name == following


# -- targets ---------------------------------------------------------------------------------


def test_target_host_header_bytes() -> None:
    spec = [
        {"name": "keep", "url": "http://keep.internal"},
        {"name": "mine", "url": "http://Mine.internal:8081", "host_header": "backend"},
        {"name": "lit", "url": "http://lit.internal", "host_header": "app.example.com"},
    ]
    table = new_router(make_config(backends=spec)).table
    assert table.by_name["keep"].host_header is None
    assert table.by_name["mine"].host_header == b"Mine.internal:8081"
    assert table.by_name["lit"].host_header == b"app.example.com"


def test_target_tls_settings() -> None:
    spec: list[dict[str, Any]] = [
        {"name": "plain", "url": "http://plain.internal"},
        {"name": "tls", "url": "https://tls.internal"},
        {"name": "lax", "url": "https://lax.internal:8443", "tls_verify": False},
    ]
    table = new_router(make_config(backends=spec)).table
    plain, tls, lax = (table.by_name[n] for n in ("plain", "tls", "lax"))
    assert plain.endpoint.ssl_context is None
    assert plain.endpoint.server_hostname is None
    assert (plain.endpoint.host, plain.endpoint.port) == ("plain.internal", 80)
    assert tls.endpoint.ssl_context is not None
    assert tls.endpoint.ssl_context.check_hostname
    assert (tls.endpoint.server_hostname, tls.endpoint.port) == ("tls.internal", 443)
    assert lax.endpoint.ssl_context is not None
    assert not lax.endpoint.ssl_context.check_hostname
    assert lax.endpoint.port == 8443


def test_targets_keep_list_order() -> None:
    table = new_router(make_config(backends=weighted(("c", 1), ("a", 1), ("b", 1)))).table
    assert [t.name for t in table.targets] == ["c", "a", "b"]
    assert table.by_name["a"].state is not None


# -- Router.apply ----------------------------------------------------------------------------


def test_apply_carries_state_over_by_name() -> None:
    router = new_router(make_config())
    blue, green = router.states["blue"], router.states["green"]
    blue.in_flight = 3
    router.states["green"].set_health(False, "test")
    table = router.apply(make_config(backends=weighted(("green", 1), ("blue", 9), ("new", 1))))
    assert router.table is table
    assert router.states["blue"] is blue
    assert router.states["green"] is green
    assert table.by_name["blue"].state is blue
    assert table.by_name["green"].state is green
    assert blue.in_flight == 3
    assert not green.healthy
    assert "green" not in names(table, 20)


def test_apply_creates_state_for_new_names_and_drops_removed_ones() -> None:
    router = new_router(make_config())
    table = router.apply(make_config(backends=weighted(("blue", 1), ("canary", 1))))
    canary = router.states["canary"]
    assert isinstance(canary, BackendState)
    assert canary.name == "canary"
    assert table.by_name["canary"].state is canary
    assert set(router.states) == {"blue", "canary"}


def test_apply_asks_initial_health_only_for_new_backends() -> None:
    asked: list[str] = []

    def initial(backend: Any) -> bool:
        asked.append(backend.name)
        return False

    router = new_router(make_config(), initial_health=initial)
    assert asked == ["blue", "green"]
    router.apply(make_config(backends=weighted(("blue", 1), ("canary", 1))))
    assert asked == ["blue", "green", "canary"]


def test_apply_bumps_the_generation_and_old_tables_keep_working() -> None:
    router = new_router(make_config())
    old = router.table
    assert old.generation == router.generation == 1
    new = router.apply(make_config(backends=weighted(("blue", 1))))
    assert new.generation == router.generation == 2
    assert router.table is new
    # A request that started on the old snapshot still has its own targets.
    assert {t.name for t in old.targets} == {"blue", "green"}
    assert old.pick() is not None


def test_apply_switches_the_ratio() -> None:
    router = new_router(make_config())
    router.apply(make_config(backends=weighted(("blue", 0), ("green", 1))))
    assert set(names(router.table, 20)) == {"green"}


def test_pool_is_shared_between_target_and_endpoints() -> None:
    router = new_router(make_config())
    for target in router.table.targets:
        assert router.endpoints.by_key[endpoint_key(target.backend)].pool is target.endpoint.pool


def test_pool_with_idle_connections_carried_over_when_endpoint_unchanged() -> None:
    router = new_router(make_config())
    pool = router.table.by_name["blue"].endpoint.pool
    connection = fake_connection()
    pool.put(connection, 0.0)
    router.apply(make_config(backends=weighted(("blue", 1), ("green", 9))))
    assert router.table.by_name["blue"].endpoint.pool is pool
    assert not pool.closed
    assert connection.alive


def test_empty_pool_carried_over_when_endpoint_unchanged() -> None:
    router = new_router(make_config())
    pool = router.table.by_name["blue"].endpoint.pool
    assert len(pool) == 0
    router.apply(make_config(backends=weighted(("blue", 1), ("green", 9))))
    assert router.table.by_name["blue"].endpoint.pool is pool


def test_router_close_reaches_connections_returned_after_a_reload() -> None:
    router = new_router(make_config())
    old_pool = router.table.by_name["blue"].endpoint.pool
    router.apply(make_config(backends=weighted(("blue", 1), ("green", 9))))
    connection = fake_connection()
    old_pool.put(connection, 0.0)  # the in-flight one comes back
    router.endpoints.close()
    assert not connection.alive


@pytest.mark.parametrize(
    "change",
    [
        {"url": "http://blue-v2.internal"},
        {"url": "http://blue.internal:443"},
        {"url": "https://blue.internal:8443"},
        {"url": "https://blue.internal", "tls_verify": False},
    ],
)
def test_pool_replaced_and_closed_when_endpoint_changes(change: dict[str, Any]) -> None:
    router = new_router(make_config(backends=[{"name": "blue", "url": "https://blue.internal"}]))
    old_pool = router.table.by_name["blue"].endpoint.pool
    connection = fake_connection()
    old_pool.put(connection, 0.0)
    router.apply(make_config(backends=[{"name": "blue", **change}]))
    new_pool = router.table.by_name["blue"].endpoint.pool
    assert new_pool is not old_pool
    assert isinstance(new_pool, UpstreamPool)
    assert old_pool.closed
    assert not connection.alive
    assert not new_pool.closed
    assert list(router.endpoints.pools) == [new_pool]


def test_pool_of_a_removed_backend_is_closed() -> None:
    router = new_router(make_config())
    green_pool = router.table.by_name["green"].endpoint.pool
    router.apply(make_config(backends=weighted(("blue", 1))))
    assert green_pool.closed
    assert green_pool not in router.endpoints.pools


def test_closing_the_endpoints_closes_every_pool() -> None:
    router = new_router(make_config())
    pools = list(router.endpoints.pools)
    router.endpoints.close()
    assert all(pool.closed for pool in pools)


def test_expire_idle_retires_old_connections() -> None:
    router = new_router(make_config())
    pool = router.table.by_name["blue"].endpoint.pool
    old, fresh = fake_connection(), fake_connection()
    pool.put(old, 0.0)
    pool.put(fresh, 100.0)
    router.endpoints.expire_idle(100.0 + pool.max_idle / 2)
    assert not old.alive
    assert fresh.alive


def test_upstream_idle_sets_how_long_pooled_connections_may_wait() -> None:
    def with_upstream_idle(value: str) -> Config:
        return parse_config(
            {
                "backends": [{"name": "blue", "url": "http://blue.internal"}],
                "timeouts": {"upstream_idle": value},
            }
        )

    router = new_router(with_upstream_idle("4s"))
    pool = router.table.by_name["blue"].endpoint.pool
    assert pool.max_idle == 4.0
    waiting = fake_connection()
    pool.put(waiting, 0.0)
    router.endpoints.expire_idle(3.5)
    assert waiting.alive
    router.endpoints.expire_idle(4.5)
    assert not waiting.alive
    router.apply(with_upstream_idle("9s"))  # a reload changes the pools it keeps too
    assert router.table.by_name["blue"].endpoint.pool is pool and pool.max_idle == 9.0


def test_repr_is_informative() -> None:
    table = new_router(make_config()).table
    assert "gen=1" in repr(table)
    assert "round_robin" in repr(table)
    assert "blue" in repr(table.by_name["blue"])


def test_routing_imports_no_networking_code() -> None:
    """Routing keeps names, weights and precomputed bytes; how to reach a backend (pools, TLS
    contexts, sockets) is the data plane's. (``socket`` itself comes with the config models.)"""
    code = (
        "import sys\n"
        "import tdproxy.routing.router, tdproxy.routing.table, tdproxy.routing.selection\n"
        "roots = ('ssl', 'asyncio', 'aiohttp', 'httptools', 'uvloop')\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in roots or m.startswith('tdproxy.dataplane')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
