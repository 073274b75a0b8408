"""``tdproxy weights`` decisions without I/O: arguments, swap, shares and the lines printed."""

from __future__ import annotations

import pytest

from tdproxy.config.loader import parse_config_text
from tdproxy.config.model import Config
from tdproxy.controlplane.status_client import reports, status_url, wait_for_weights
from tdproxy.weights import (
    WeightsError,
    change_lines,
    configmap_hint,
    parse_assignments,
    percent,
    show_lines,
    swapped,
)


def config(*backends: str, method: str = "round_robin") -> Config:
    lines = [f"routing: {{method: {method}}}", "backends:"]
    for spec in backends:
        name, _, rest = spec.partition(":")
        weight, _, backup = rest.partition(":")
        lines.append(f"  - {{name: {name}, url: http://{name}, weight: {weight}}}")
        if backup:
            lines[-1] = lines[-1][:-1] + ", backup: true}"
    return parse_config_text("\n".join(lines) + "\n")


BLUE_GREEN = config("blue:70", "green:30", "spare:1:backup")


def test_assignments_are_checked_against_the_config() -> None:
    assert parse_assignments(["blue=0", "green=100"], BLUE_GREEN) == {"blue": 0, "green": 100}
    assert parse_assignments(["spare=1000000"], BLUE_GREEN) == {"spare": 1_000_000}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["red=1"], "unknown backend 'red' (the backends are blue, green, spare)"),
        (["blue"], "expected NAME=WEIGHT"),
        (["=5"], "expected NAME=WEIGHT"),
        (["blue=-1"], "whole number from 0 to 1000000"),
        (["blue=1000001"], "whole number from 0 to 1000000"),
        (["blue=1.5"], "whole number"),
        (["blue="], "whole number"),
        (["blue=\u0661"], "whole number"),  # an Arabic-Indic digit: isdigit() but not ASCII
        (["blue=1", "blue=2"], "blue: given more than once"),
    ],
)
def test_bad_assignments_say_what_is_wrong(arguments: list[str], message: str) -> None:
    with pytest.raises(WeightsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_assignments(arguments, BLUE_GREEN)


def test_swap_exchanges_the_two_non_backup_weights() -> None:
    assert swapped(BLUE_GREEN) == {"blue": 30, "green": 70}


def test_swap_needs_exactly_two_non_backup_backends_and_names_them() -> None:
    with pytest.raises(WeightsError, match="the config has 3: a, b, c"):
        swapped(config("a:1", "b:1", "c:1", "d:1:backup"))
    with pytest.raises(WeightsError, match="the config has 1: a"):
        swapped(config("a:1", "d:1:backup"))


def test_shares_are_rounded_readably() -> None:
    shares = (0.0, 1.0, 0.7, 1 / 3, 0.0005, 0.99999, None)
    assert [percent(s) for s in shares] == [
        "0%",
        "100%",
        "70%",
        "33.3%",
        "<0.1%",
        ">99.9%",
        "backup",
    ]


def test_change_lines_are_aligned_and_backups_say_backup() -> None:
    assert change_lines(BLUE_GREEN, {"blue": 0, "green": 100}) == [
        "blue   70% -> 0%",
        "green  30% -> 100%",
        "spare  backup",
    ]


def test_show_lines_give_weight_share_and_backup() -> None:
    assert show_lines(BLUE_GREEN) == [
        "blue   weight 70  70%",
        "green  weight 30  30%",
        "spare  weight 1   backup",
    ]


def test_failover_says_that_weights_are_ignored() -> None:
    lines = show_lines(config("a:1", "b:1", method="failover"))
    assert lines[-1].startswith("(routing.method is failover: weights are ignored")


def test_the_configmap_hint_gives_kubectl_commands_for_the_same_change() -> None:
    hint = configmap_hint("tdproxy.yaml", "tdproxy weights set blue=0", certain=True)
    assert hint[0].startswith("Change the ConfigMap instead")
    assert "  kubectl edit configmap <configmap>" in hint
    assert "  tdproxy weights set blue=0 --config tdproxy.yaml" in hint
    assert hint[-1].endswith("--dry-run=client -o yaml | kubectl apply -f -")
    assert "{.data.tdproxy\\.yaml}" in hint[3]


def test_the_status_url_of_a_config() -> None:
    assert status_url(BLUE_GREEN.admin) == "http://127.0.0.1:9901/api/v1/status"
    wildcard = parse_config_text("backends: [{name: a, url: http://a}]\nadmin: {address: '::'}")
    assert status_url(wildcard.admin) == "http://[::1]:9901/api/v1/status"
    ephemeral = parse_config_text("backends: [{name: a, url: http://a}]\nadmin: {port: 0}")
    assert status_url(ephemeral.admin) is None


def test_the_proxy_reports_new_weights_only_in_a_newer_generation() -> None:
    document = {
        "generation": 4,
        "backends": [{"name": "a", "weight": 0}, {"name": "b", "weight": 9}],
    }
    assert reports(document, 3, {"a": 0, "b": 9})
    assert not reports(document, 4, {"a": 0, "b": 9})
    assert not reports(document, 3, {"a": 1, "b": 9})


def test_waiting_for_an_unreachable_proxy_ends_at_the_deadline() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    url = "http://127.0.0.1:1/api/v1/status"  # port 1: nothing listens there
    assert (
        wait_for_weights(url, 1, {"a": 1}, timeout=0.5, clock=lambda: now[0], sleep=sleep) is None
    )
    assert 0.5 <= now[0] < 0.7
