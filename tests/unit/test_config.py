"""Config parsing: defaults, durations, strict keys with error paths, and the shipped file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tdproxy.config import Config, ConfigError, load_config, parse_config, parse_config_text
from tdproxy.config.durations import format_duration, parse_duration
from tdproxy.config.loader import DEFAULT_PATH, ENV_VAR, key_path, resolve_path
from tdproxy.config.model import (
    AccessLog,
    Admin,
    Backend,
    Entrypoint,
    HealthCheck,
    Limits,
    PassiveHealth,
    Routing,
    Sticky,
    Timeouts,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "tdproxy.yaml"

TWO_BACKENDS = [
    {"name": "blue", "url": "http://blue.example.com"},
    {"name": "green", "url": "http://green.example.com"},
]


def config(**sections: Any) -> Config:
    sections.setdefault("backends", TWO_BACKENDS)
    return parse_config(sections)


def errors_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def errors_with(**sections: Any) -> list[str]:
    sections.setdefault("backends", TWO_BACKENDS)
    return errors_of(sections)


def backend_errors(**fields: Any) -> list[str]:
    return errors_of({"backends": [{"name": "blue", "url": "http://blue", **fields}]})


# -- defaults (DESIGN.md's YAML) -------------------------------------------------------------


def test_minimal_config_gets_every_documented_default() -> None:
    cfg = parse_config({"backends": [{"name": "only", "url": "http://only.example.com"}]})

    assert cfg.entrypoint.address == "0.0.0.0"
    assert cfg.entrypoint.port == 8080
    assert cfg.entrypoint.tls is None
    assert cfg.entrypoint.redirect_http_port is None

    assert cfg.routing.method == "round_robin"
    assert cfg.routing.sticky.cookie == "TDSESSION"
    assert cfg.routing.sticky.max_age is None
    assert cfg.routing.sticky.secret is None
    assert cfg.routing.override_header is None
    assert cfg.routing.override_cookie is None
    assert cfg.routing.when_all_down == "fail_open"

    assert cfg.health_check.enabled is True
    assert cfg.health_check.type == "http"
    assert cfg.health_check.path == "/"
    assert cfg.health_check.interval == 3.0
    assert cfg.health_check.timeout == 1.0
    assert cfg.health_check.fall == 3
    assert cfg.health_check.rise == 3
    assert cfg.health_check.expect_status == ((200, 200),)
    assert cfg.health_check.passive.max_failures == 3

    assert cfg.timeouts.connect == 10.0
    assert cfg.timeouts.response_header == 60.0
    assert cfg.timeouts.client_header == 15.0
    assert cfg.timeouts.client_body == 60.0
    assert cfg.timeouts.idle == 75.0
    assert cfg.timeouts.shutdown_grace == 30.0

    assert cfg.limits.max_header_bytes == 32768
    assert cfg.limits.max_headers == 100
    assert cfg.limits.max_url_bytes == 8192
    assert cfg.limits.max_body_bytes is None
    assert cfg.limits.max_connections == 10000

    assert cfg.admin.address == "127.0.0.1"
    assert cfg.admin.port == 9901
    assert cfg.admin.token is None
    assert cfg.admin.token_env is None

    assert cfg.access_log.enabled is True
    assert cfg.access_log.format == "json"


def test_backend_defaults() -> None:
    backend = config().backends[0]
    assert backend.backup is False
    assert backend.host_header == "preserve"
    assert backend.tls_verify is True
    assert backend.weight == 1


def test_default_instances_equal_the_defaults_inside_a_parsed_config() -> None:
    cfg = config()
    assert cfg.entrypoint == Entrypoint()
    assert cfg.routing == Routing()
    assert cfg.routing.sticky == Sticky()
    assert cfg.health_check == HealthCheck()
    assert cfg.health_check.passive == PassiveHealth()
    assert cfg.timeouts == Timeouts()
    assert cfg.limits == Limits()
    assert cfg.admin == Admin()
    assert cfg.access_log == AccessLog()


# -- the shipped file ------------------------------------------------------------------------


def test_shipped_config_is_valid() -> None:
    cfg = load_config(str(SHIPPED))
    assert [b.name for b in cfg.backends] == ["primary-env", "second-env"]
    assert [b.weight for b in cfg.backends] == [50, 50]


def test_shipped_config_states_the_documented_defaults() -> None:
    cfg = load_config(str(SHIPPED))
    assert cfg.entrypoint == Entrypoint()
    assert cfg.routing == Routing()
    assert cfg.health_check == HealthCheck()
    assert cfg.timeouts == Timeouts()
    assert cfg.limits == Limits()
    assert cfg.admin == Admin()
    assert cfg.access_log == AccessLog()
    for backend in cfg.backends:
        assert backend.backup is False
        assert backend.host_header == "preserve"
        assert backend.tls_verify is True


def test_default_path_is_the_shipped_file() -> None:
    assert (REPO / DEFAULT_PATH).resolve() == SHIPPED


# -- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("3s", 3.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0.25m", 15.0),
        ("250 ms", 0.25),
        (" 3s ", 3.0),
        ("7", 7.0),
        (5, 5.0),
        (0.1, 0.1),
    ],
)
def test_parse_duration_accepts(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["", "abc", "3sec", "3 seconds", "1d", "s", "ms", ".5s", "1,5s", "3s3", None, [3], {}],
)
def test_parse_duration_rejects_garbage(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_rejects_booleans(value: bool) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [-1, -0.5, "-3s", "-500ms"])
def test_parse_duration_rejects_negative(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_negative_number_says_so() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(-1)


def test_parse_duration_rejects_nan() -> None:
    with pytest.raises(ValueError):
        parse_duration(math.nan)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.5, "500ms"), (0.001, "1ms"), (3.0, "3s"), (1.5, "1.5s"), (120, "120s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_durations_in_yaml_become_seconds() -> None:
    cfg = parse_config_text(
        "backends: [{name: a, url: 'http://a'}]\n"
        "health_check: {interval: 500ms, timeout: 250ms}\n"
        "timeouts: {connect: 2m, idle: 90, shutdown_grace: 1.5}\n"
        "routing: {sticky: {max_age: 1h}}\n"
    )
    assert cfg.health_check.interval == 0.5
    assert cfg.health_check.timeout == 0.25
    assert cfg.timeouts.connect == 120.0
    assert cfg.timeouts.idle == 90.0
    assert cfg.timeouts.shutdown_grace == 1.5
    assert cfg.routing.sticky.max_age == 3600.0


def test_invalid_duration_is_reported_with_its_key_path() -> None:
    errors = errors_with(timeouts={"connect": "soon"})
    assert len(errors) == 1
    assert errors[0].startswith("timeouts.connect: ")
    assert "'soon' is not a duration" in errors[0]


def test_negative_duration_is_reported_with_its_key_path() -> None:
    assert errors_with(timeouts={"idle": -1}) == ["timeouts.idle: must not be negative"]


def test_health_interval_must_be_positive() -> None:
    errors = errors_with(health_check={"interval": "0s"})
    assert errors == ["health_check.interval: must be greater than 0"]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("timeouts", "connect"),
        ("timeouts", "response_header"),
        ("timeouts", "client_header"),
        ("timeouts", "client_body"),
        ("timeouts", "idle"),
        ("timeouts", "shutdown_grace"),
        ("timeouts", "client_send"),
        ("timeouts", "tunnel_idle"),
        ("timeouts", "upstream_idle"),
        ("health_check", "timeout"),
    ],
)
@pytest.mark.parametrize("zero", [0, "0", "0s", "0ms", 0.0])
def test_zero_durations_are_refused_with_their_key_path(
    section: str, key: str, zero: object
) -> None:
    assert errors_with(**{section: {key: zero}}) == [f"{section}.{key}: must be greater than 0"]


def test_new_timeouts_have_safe_defaults() -> None:
    timeouts = config().timeouts
    assert timeouts.client_send == 60.0
    assert timeouts.tunnel_idle is None  # off unless asked for
    assert timeouts.upstream_idle == 30.0
    assert config(timeouts={"tunnel_idle": "1h"}).timeouts.tunnel_idle == 3600.0


def test_duration_fields_are_not_nullable() -> None:
    errors = errors_with(timeouts={"connect": None})
    assert len(errors) == 1
    assert errors[0].startswith("timeouts.connect: ")


# -- unknown keys ----------------------------------------------------------------------------


def test_unknown_key_in_a_backend_names_the_item() -> None:
    backends = [
        {"name": "blue", "url": "http://blue"},
        {"name": "green", "url": "http://green", "wieght": 5},
    ]
    assert errors_of({"backends": backends}) == ["backends[1].wieght: unknown key"]


@pytest.mark.parametrize(
    ("sections", "path"),
    [
        ({"bogus": 1}, "bogus"),
        ({"entrypoint": {"prot": 1}}, "entrypoint.prot"),
        ({"entrypoint": {"tls": {"certificate": "c", "key": "k", "ca": "x"}}}, "entrypoint.tls.ca"),
        ({"routing": {"methd": "sticky"}}, "routing.methd"),
        ({"routing": {"sticky": {"cookei": "x"}}}, "routing.sticky.cookei"),
        ({"health_check": {"intervall": "3s"}}, "health_check.intervall"),
        ({"health_check": {"passive": {"max_fails": 1}}}, "health_check.passive.max_fails"),
        ({"timeouts": {"read": "3s"}}, "timeouts.read"),
        ({"limits": {"max_body": 1}}, "limits.max_body"),
        ({"admin": {"tokn": "x"}}, "admin.tokn"),
        ({"access_log": {"formt": "json"}}, "access_log.formt"),
    ],
)
def test_unknown_keys_are_rejected_at_any_depth(sections: dict[str, Any], path: str) -> None:
    assert errors_with(**sections) == [f"{path}: unknown key"]


# -- backends --------------------------------------------------------------------------------


def test_negative_weight_has_key_path_and_bound() -> None:
    backends = [
        {"name": "blue", "url": "http://blue"},
        {"name": "green", "url": "http://green", "weight": -1},
    ]
    assert errors_of({"backends": backends}) == ["backends[1].weight: must be >= 0"]


def test_weight_upper_bound() -> None:
    assert backend_errors(weight=1_000_001) == ["backends[0].weight: must be <= 1000000"]
    assert parse_config({"backends": [{"name": "a", "url": "http://a", "weight": 1_000_000}]})


def test_fractional_weight_is_rejected() -> None:
    errors = backend_errors(weight=1.5)
    assert len(errors) == 1
    assert errors[0].startswith("backends[0].weight: ")


def test_zero_weight_is_allowed_beside_a_weighted_backend() -> None:
    backends = [
        {"name": "blue", "url": "http://blue", "weight": 0},
        {"name": "green", "url": "http://green", "weight": 1},
    ]
    assert [b.weight for b in parse_config({"backends": backends}).backends] == [0, 1]


def test_all_zero_weights_rejected_unless_failover() -> None:
    backends = [{"name": "a", "url": "http://a", "weight": 0}]
    errors = errors_of({"backends": backends})
    assert len(errors) == 1
    assert "at least one backend needs a weight above 0" in errors[0]
    cfg = parse_config({"routing": {"method": "failover"}, "backends": backends})
    assert cfg.backends[0].weight == 0


def test_only_backups_is_rejected() -> None:
    errors = backend_errors(backup=True)
    assert len(errors) == 1
    assert "must not be a backup" in errors[0]


@pytest.mark.parametrize("backends", [[], None])
def test_at_least_one_backend(backends: object) -> None:
    data = {} if backends is None else {"backends": backends}
    errors = errors_of(data)
    assert len(errors) == 1
    assert errors[0].startswith("backends: ")


def test_empty_backend_list_message() -> None:
    assert errors_of({"backends": []}) == ["backends: needs at least one backend"]


def test_missing_backends_message() -> None:
    assert errors_of({}) == ["backends: is required"]


def test_backend_name_and_url_are_required() -> None:
    errors = errors_of({"backends": [{"weight": 1}]})
    assert sorted(errors) == ["backends[0].name: is required", "backends[0].url: is required"]


def test_backend_names_must_be_unique() -> None:
    backends = [
        {"name": "blue", "url": "http://a"},
        {"name": "blue", "url": "http://b"},
    ]
    errors = errors_of({"backends": backends})
    assert len(errors) == 1
    assert "'blue' is used more than once" in errors[0]


@pytest.mark.parametrize("name", ["a", "blue-env", "env_2", "v1.2", "A" * 63, "9lives"])
def test_valid_backend_names(name: str) -> None:
    assert parse_config({"backends": [{"name": name, "url": "http://a"}]}).backends[0].name == name


@pytest.mark.parametrize("name", ["", "-blue", ".env", "blue env", "a/b", "é", "A" * 64])
def test_invalid_backend_names(name: str) -> None:
    errors = backend_errors(name=name)
    assert len(errors) == 1
    assert errors[0].startswith("backends[0].name: must be 1-63 characters")


@pytest.mark.parametrize(
    "url",
    [
        "http://blue.example.com",
        "https://blue.example.com",
        "http://blue.example.com/",
        "http://10.0.0.5:8080",
        "https://[::1]:8443",
        "HTTP://Blue.Example.com",
    ],
)
def test_valid_backend_urls(url: str) -> None:
    assert parse_config({"backends": [{"name": "a", "url": url}]}).backends[0].url == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://blue", "must start with http:// or https://"),
        ("blue.example.com", "must start with http:// or https://"),
        ("ws://blue", "must start with http:// or https://"),
        ("http://", "has no host"),
        ("https://:8080", "has no host"),
        ("http://blue/app", "must not have a path, query or fragment"),
        ("http://blue?x=1", "must not have a path, query or fragment"),
        ("http://blue#top", "must not have a path, query or fragment"),
        ("http://user:pw@blue", "must not carry credentials"),
        ("http://blue:99999", "has an invalid port"),
        ("http://blue:http", "has an invalid port"),
    ],
)
def test_invalid_backend_urls(url: str, reason: str) -> None:
    errors = backend_errors(url=url)
    assert len(errors) == 1
    assert errors[0].startswith("backends[0].url: ")
    assert reason in errors[0]


def test_backend_url_views() -> None:
    backends = [
        {"name": "a", "url": "http://a.example.com"},
        {"name": "b", "url": "https://b.example.com"},
        {"name": "c", "url": "http://c.example.com:8081/"},
        {"name": "d", "url": "https://D.example.com:8443"},
    ]
    a, b, c, d = parse_config({"backends": backends}).backends
    assert (a.scheme, a.host, a.port, a.authority) == ("http", "a.example.com", 80, "a.example.com")
    assert (b.scheme, b.host, b.port, b.authority) == (
        "https",
        "b.example.com",
        443,
        "b.example.com",
    )
    assert (c.port, c.authority) == (8081, "c.example.com:8081")
    # authority as written (what host_header: backend sends); hostname lower-cased for DNS/SNI.
    assert (d.host, d.port, d.authority) == ("d.example.com", 8443, "D.example.com:8443")


@pytest.mark.parametrize(
    "value", ["preserve", "backend", "app.example.com", "app.example.com:8080"]
)
def test_valid_host_header(value: str) -> None:
    assert (
        parse_config({"backends": [{"name": "a", "url": "http://a", "host_header": value}]})
        .backends[0]
        .host_header
        == value
    )


@pytest.mark.parametrize("value", ["", "two words", "a/b", "user@host", "a\r\nX: y"])
def test_invalid_host_header(value: str) -> None:
    errors = backend_errors(host_header=value)
    assert len(errors) == 1
    assert errors[0].startswith("backends[0].host_header: ")


def test_config_backend_lookup() -> None:
    cfg = config()
    assert cfg.backend("green") is cfg.backends[1]
    assert cfg.backend("nope") is None


# -- health_check ----------------------------------------------------------------------------


def test_expect_status_codes_and_ranges() -> None:
    cfg = config(health_check={"expect_status": [200, "204", "300-399", " 401 - 403 "]})
    assert cfg.health_check.expect_status == ((200, 200), (204, 204), (300, 399), (401, 403))
    accepts = cfg.health_check.accepts
    assert [accepts(s) for s in (200, 204, 300, 350, 399, 401, 403)] == [True] * 7
    assert [accepts(s) for s in (201, 299, 400, 404, 500)] == [False] * 5


def test_expect_status_single_value_is_a_list_of_one() -> None:
    assert config(health_check={"expect_status": 204}).health_check.expect_status == ((204, 204),)
    assert config(health_check={"expect_status": "200-399"}).health_check.expect_status == (
        (200, 399),
    )


def test_expect_status_default_accepts_only_200() -> None:
    health = config().health_check
    assert health.accepts(200)
    assert not health.accepts(204)
    assert not health.accepts(301)


@pytest.mark.parametrize(
    "item", ["2xx", "399-200", 99, 600, "200-600", True, "abc", None, 200.5, "200-"]
)
def test_expect_status_rejects(item: object) -> None:
    errors = errors_with(health_check={"expect_status": [item]})
    assert len(errors) == 1
    assert errors[0].startswith("health_check.expect_status")


def test_expect_status_must_not_be_empty() -> None:
    assert errors_with(health_check={"expect_status": []}) == [
        "health_check.expect_status: needs at least one status code"
    ]


@pytest.mark.parametrize("path", ["health", "/a b", ""])
def test_health_path_must_start_with_slash(path: str) -> None:
    errors = errors_with(health_check={"path": path})
    assert errors == ["health_check.path: must start with '/' and contain no whitespace"]


@pytest.mark.parametrize(("key", "value"), [("fall", 0), ("rise", 0), ("fall", -1)])
def test_fall_and_rise_at_least_one(key: str, value: int) -> None:
    assert errors_with(health_check={key: value}) == [f"health_check.{key}: must be >= 1"]


def test_health_type_choices() -> None:
    assert config(health_check={"type": "tcp"}).health_check.type == "tcp"
    errors = errors_with(health_check={"type": "icmp"})
    assert errors == ["health_check.type: must be one of 'http' or 'tcp'"]


# -- other sections --------------------------------------------------------------------------


def test_routing_method_choices() -> None:
    for method in ("round_robin", "sticky", "failover"):
        assert config(routing={"method": method}).routing.method == method
    errors = errors_with(routing={"method": "random"})
    assert len(errors) == 1
    assert errors[0].startswith("routing.method: must be one of ")
    assert "'sticky'" in errors[0]


def test_when_all_down_choices() -> None:
    assert config(routing={"when_all_down": "reject"}).routing.when_all_down == "reject"
    assert errors_with(routing={"when_all_down": "panic"}) == [
        "routing.when_all_down: must be one of 'fail_open' or 'reject'"
    ]


@pytest.mark.parametrize("key", ["override_header", "override_cookie"])
def test_override_names_must_be_tokens(key: str) -> None:
    assert getattr(config(routing={key: "X-TD-Backend"}).routing, key) == "X-TD-Backend"
    errors = errors_with(routing={key: "X TD: Backend"})
    assert len(errors) == 1
    assert errors[0].startswith(f"routing.{key}: ")


def test_sticky_cookie_name_must_be_a_token() -> None:
    errors = errors_with(routing={"sticky": {"cookie": "bad;name"}})
    assert len(errors) == 1
    assert errors[0].startswith("routing.sticky.cookie: ")


def test_entrypoint_tls_needs_certificate_and_key() -> None:
    cfg = config(entrypoint={"tls": {"certificate": "/c.pem", "key": "/k.pem"}})
    assert cfg.entrypoint.tls is not None
    assert (cfg.entrypoint.tls.certificate, cfg.entrypoint.tls.key) == ("/c.pem", "/k.pem")
    assert errors_with(entrypoint={"tls": {"certificate": "/c.pem"}}) == [
        "entrypoint.tls.key: is required"
    ]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"entrypoint": {"port": 65536}}, "entrypoint.port: must be <= 65535"),
        ({"entrypoint": {"port": -1}}, "entrypoint.port: must be >= 0"),
        ({"entrypoint": {"redirect_http_port": 0}}, "entrypoint.redirect_http_port"),
        ({"admin": {"port": 70000}}, "admin.port: must be <= 65535"),
        ({"limits": {"max_header_bytes": 100}}, "limits.max_header_bytes: must be >= 1024"),
        ({"limits": {"max_headers": 0}}, "limits.max_headers: must be >= 1"),
        ({"limits": {"max_url_bytes": 1}}, "limits.max_url_bytes: must be >= 16"),
        ({"limits": {"max_body_bytes": -1}}, "limits.max_body_bytes"),
        ({"limits": {"max_connections": 0}}, "limits.max_connections: must be >= 1"),
        ({"health_check": {"passive": {"max_failures": -1}}}, "max_failures: must be >= 0"),
        ({"access_log": {"format": "xml"}}, "access_log.format: must be one of"),
    ],
)
def test_bounds_and_choices(section: dict[str, Any], message: str) -> None:
    errors = errors_with(**section)
    assert len(errors) == 1
    assert message in errors[0]


def test_entrypoint_port_zero_means_any_free_port() -> None:
    assert config(entrypoint={"port": 0}).entrypoint.port == 0


def test_max_body_bytes_may_be_set() -> None:
    assert config(limits={"max_body_bytes": 1024}).limits.max_body_bytes == 1024


def test_admin_token_or_token_env() -> None:
    assert config(admin={"token": "s3cret"}).admin.token == "s3cret"
    assert config(admin={"token_env": "TD_TOKEN"}).admin.token_env == "TD_TOKEN"
    assert errors_with(admin={"token": "s3cret", "token_env": "TD_TOKEN"}) == [
        "admin: set either token or token_env, not both"
    ]


# -- error reporting -------------------------------------------------------------------------


def test_every_error_is_reported_at_once() -> None:
    data = {
        "entrypoint": {"port": 70000},
        "routing": {"method": "random", "sticky": {"cookei": "x"}},
        "backends": [
            {"name": "blue", "url": "ftp://blue"},
            {"name": "green", "url": "http://green", "weight": -1, "wieght": 5},
        ],
        "health_check": {"fall": 0},
        "timeouts": {"idle": "forever"},
        "limits": {"max_headers": 0},
        "admin": {"tokn": "x"},
    }
    errors = errors_of(data)
    paths = sorted(error.split(": ", 1)[0] for error in errors)
    assert paths == sorted(
        [
            "entrypoint.port",
            "routing.method",
            "routing.sticky.cookei",
            "backends[0].url",
            "backends[1].weight",
            "backends[1].wieght",
            "health_check.fall",
            "timeouts.idle",
            "limits.max_headers",
            "admin.tokn",
        ]
    )


def test_errors_in_several_backends_are_all_reported() -> None:
    backends = [{"name": f"b{i}", "url": "http://x", "weight": -1} for i in range(3)]
    assert errors_of({"backends": backends}) == [
        "backends[0].weight: must be >= 0",
        "backends[1].weight: must be >= 0",
        "backends[2].weight: must be >= 0",
    ]


def test_duplicate_names_reported_together_with_field_errors() -> None:
    backends = [
        {"name": "blue", "url": "http://a"},
        {"name": "blue", "url": "http://b", "wieght": 5},
    ]
    errors = errors_of({"backends": backends})
    assert "backends[1].wieght: unknown key" in errors
    assert any("'blue' is used more than once" in error for error in errors)


def test_every_bad_expect_status_item_is_reported() -> None:
    errors = errors_with(health_check={"expect_status": ["2xx", 200, 600]})
    assert len(errors) == 2


def test_key_path_formatting() -> None:
    assert key_path(("backends", 1, "weight")) == "backends[1].weight"
    assert key_path(("routing", "sticky", "cookie")) == "routing.sticky.cookie"
    assert key_path(("backends",)) == "backends"
    assert key_path(()) == "(top level)"


@pytest.mark.parametrize("data", [[1, 2], "text", 42])
def test_top_level_must_be_a_mapping(data: object) -> None:
    assert errors_of(data) == ["(top level): must be a mapping of keys to values"]


def test_config_error_describes_file_and_every_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"backends": [{"name": "a", "url": "http://a", "weight": -1}]}, "f.yaml")
    error = info.value
    assert error.path == "f.yaml"
    assert error.describe() == (
        "f.yaml: invalid configuration (1 error(s))\n  backends[0].weight: must be >= 0"
    )
    assert str(error) == error.describe()


# -- YAML text and files ---------------------------------------------------------------------


def test_invalid_yaml_is_reported_with_its_line() -> None:
    text = "backends:\n  - name: a\n   url: http://a\n"
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "bad.yaml")
    assert info.value.path == "bad.yaml"
    [error] = info.value.errors
    assert error.startswith("(yaml): not valid YAML at line 3, column 4")


def test_invalid_yaml_unclosed_bracket() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text("routing: {method: sticky\nbackends: []\n")
    [error] = info.value.errors
    assert error.startswith("(yaml): not valid YAML at line ")


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_asks_for_backends(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text)
    assert info.value.errors == ["backends: is required"]


def test_yaml_scalar_top_level() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text("just a string\n")
    assert info.value.errors == ["(top level): must be a mapping of keys to values"]


def test_yaml_python_tags_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text("backends: !!python/object/apply:os.system ['true']\n")
    assert info.value.errors[0].startswith("(yaml): not valid YAML")


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.path == str(path)
    assert info.value.errors == ["file not found"]


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert info.value.errors[0].startswith("cannot read the file: ")


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"backends:\n  - name: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.errors[0].startswith("cannot read the file: ")


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "td.yaml"
    path.write_text("backends:\n  - {name: a, url: 'http://a:81', weight: 7}\n", encoding="utf-8")
    cfg = load_config(str(path))
    assert cfg.backends[0].weight == 7
    assert cfg.backends[0].port == 81


def test_resolve_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_path(None) == DEFAULT_PATH
    assert resolve_path("x.yaml") == "x.yaml"
    monkeypatch.setenv(ENV_VAR, "/etc/td.yaml")
    assert resolve_path(None) == "/etc/td.yaml"
    assert resolve_path("x.yaml") == "x.yaml"


# -- frozen ----------------------------------------------------------------------------------


def test_models_are_frozen() -> None:
    cfg = config()
    with pytest.raises(ValidationError):
        cfg.backends[0].weight = 99  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.routing.method = "sticky"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.timeouts.connect = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.health_check.passive.max_failures = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.admin = Admin()  # type: ignore[misc]


def test_collections_are_immutable() -> None:
    cfg = config()
    assert isinstance(cfg.backends, tuple)
    assert isinstance(cfg.health_check.expect_status, tuple)
    assert all(isinstance(item, tuple) for item in cfg.health_check.expect_status)


def test_models_are_hashable_and_comparable() -> None:
    assert config() == config()
    assert hash(config().backends[0]) == hash(config().backends[0])
    assert config().backends[0] != config().backends[1]


def test_backend_can_be_built_directly() -> None:
    backend = Backend(name="a", url="https://a.example.com:9443")
    assert (backend.scheme, backend.port) == ("https", 9443)
