"""benchmarks/scenarios.py and the configurations benchmarks/servers.py renders, without sockets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import scenarios as sc  # noqa: E402
import servers  # noqa: E402

from tdproxy.cli import check_text  # noqa: E402

ALL = sc.build_scenarios()


def test_every_row_of_the_comparison_is_a_scenario_in_a_fixed_order() -> None:
    assert list(ALL) == [
        "keepalive",
        "conn1000",
        "newconn",
        "1mib",
        "tls",
        "tls-handshake",
        "accesslog",
        "workers",
        "h2",
    ]


def test_scenarios_are_chosen_by_key_in_the_full_runs_order() -> None:
    assert sc.parse_scenarios("h2, keepalive") == ["keepalive", "h2"]
    with pytest.raises(ValueError, match=r"\['h3', 'tsl'\]"):
        sc.parse_scenarios("h2,h3,tsl")
    with pytest.raises(ValueError):
        sc.parse_scenarios(" , ")


@pytest.mark.parametrize("key", list(ALL))
def test_comparisons_name_variants_of_their_own_scenario(key: str) -> None:
    scenario = ALL[key]
    names = [v.name for v in scenario.variants]
    assert len(names) == len(set(names))
    for c in scenario.comparisons:
        assert scenario.variant(c.numerator) is not None, c
        assert scenario.variant(c.denominator) is not None, c


def test_the_loads_match_the_rows_they_stand_for() -> None:
    assert {v.load.connections for v in ALL["conn1000"].variants} == {1000}
    assert all(v.load.close for v in ALL["newconn"].variants + ALL["tls-handshake"].variants)
    assert all(v.server.tls for v in ALL["tls"].variants + ALL["tls-handshake"].variants)
    assert {v.load.body_size for v in ALL["1mib"].variants} == {1024 * 1024}
    anchors = {v.kind for v in ALL["keepalive"].variants}
    assert anchors == {"backend", "nginx", "haproxy", "tdproxy"}


def test_the_http2_rule_compares_one_connection_of_50_streams_with_50_connections() -> None:
    h2 = ALL["h2"]
    tdproxy, h1 = h2.variant("tdproxy"), h2.variant("tdproxy-h1")
    assert tdproxy is not None and h1 is not None
    assert (tdproxy.load.tool, tdproxy.load.connections, tdproxy.load.streams) == ("h2load", 1, 50)
    assert (h1.load.h1, h1.load.connections, h1.load.streams) == (True, 50, 1)
    assert tdproxy.server == h1.server  # one process, the protocol chosen by ALPN
    assert tdproxy.server.http2 and tdproxy.server.tls
    assert [s.key for s in h2.servers()] == ["nginx-h2", "haproxy-h2", "tdproxy-h2"]


def test_targets_filter_variants_by_server_kind() -> None:
    only = sc.select_variants(ALL["workers"], ["tdproxy"])
    assert [v.name for v in only.variants] == ["tdproxy-w1", "tdproxy-w2"]


def test_the_default_full_run_is_planned_within_15_minutes() -> None:
    seconds = sc.planned_seconds(list(ALL.values()), rounds=3, duration=5, warmup=1)
    assert 8 * 60 < seconds <= 15 * 60


def test_scaling_share_is_our_gain_over_the_anchors_gain() -> None:
    assert sc.scaling_share(100.0, 150.0, 50.0, 75.0) == pytest.approx(1.0)
    assert sc.scaling_share(100.0, 150.0, 50.0, 60.0) == pytest.approx(0.4)
    assert sc.scaling_share(100.0, 90.0, 50.0, 60.0) is None  # the anchor lost: no share


# --------------------------------------------------------------------------- configurations


def test_nginx_http2_syntax_follows_the_version() -> None:
    old = servers.nginx_listen(8443, True, True, (1, 22, 1))
    assert old == "listen 127.0.0.1:8443 ssl http2 backlog=4096;"
    new = servers.nginx_listen(8443, True, True, (1, 25, 1))
    assert new.splitlines()[0] == "listen 127.0.0.1:8443 ssl backlog=4096;"
    assert new.splitlines()[1].strip() == "http2 on;"
    assert servers.nginx_version("nginx version: nginx/1.22.1\n") == (1, 22, 1)


def _cert(tmp_path: Path) -> servers.Certificate:
    return servers.Certificate(
        tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "combined.pem", "rsa"
    )


def test_nginx_proxy_config_is_complete(tmp_path: Path) -> None:
    server = sc.Server("nginx", tls=True, http2=True, access_log=True, workers=2)
    text = servers.render_nginx_proxy(tmp_path, server, 8443, 9000, _cert(tmp_path), (1, 22, 1))
    assert "worker_processes 2;" in text
    assert "listen 127.0.0.1:8443 ssl http2 backlog=4096;" in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    assert f"access_log {tmp_path}/access.log tdjson buffer=64k" in text
    assert "server 127.0.0.1:9000 weight=50" in text
    assert "proxy_set_header X-Real-IP $remote_addr;" in text  # nginx variables kept
    plain = servers.render_nginx_proxy(tmp_path, sc.Server("nginx"), 8080, 9000, None, (1, 22, 1))
    assert "access_log off;" in plain and "ssl" not in plain


def test_haproxy_offers_h2_only_when_asked(tmp_path: Path) -> None:
    cert = _cert(tmp_path)
    h2 = servers.render_haproxy(tmp_path, sc.Server("haproxy", True, True), 1, 2, cert)
    tls = servers.render_haproxy(tmp_path, sc.Server("haproxy", True), 1, 2, cert)
    assert f"ssl crt {cert.combined} alpn h2,http/1.1" in h2
    assert "alpn http/1.1\n" in tls and "h2," not in tls
    assert "nbthread 1" in tls and "X-Forwarded-Proto https" in tls


@pytest.mark.parametrize(
    "server",
    [
        sc.Server("tdproxy"),
        sc.Server("tdproxy", access_log=True),
        sc.Server("tdproxy", tls=True, http2=True),
    ],
    ids=lambda s: s.key,
)
def test_tdproxys_own_validation_accepts_the_benchmark_config(
    server: sc.Server, tmp_path: Path
) -> None:
    cert = _cert(tmp_path)
    text = servers.tdproxy_config(server, 8443, 9901, 9000, cert)
    config = check_text(text, "bench.yaml")
    assert config.access_log.enabled is server.access_log
    assert config.health_check.enabled is False
    assert [b.weight for b in config.backends] == [50, 50]
    assert (config.entrypoint.tls is not None) is server.tls
    assert config.entrypoint.http2 is server.http2


def test_workers_key_is_written_only_for_more_than_one_worker(tmp_path: Path) -> None:
    assert "workers" not in servers.tdproxy_config(sc.Server("tdproxy"), 1, 2, 3, None)
    two = servers.tdproxy_config(sc.Server("tdproxy", workers=2), 1, 2, 3, None)
    assert two.startswith("workers: 2\n")
