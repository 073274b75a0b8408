"""The deployment files validate with the tools their users run, and agree with each other.

- ``deploy/compose/docker-compose.yml``: ``docker-compose config`` (Debian's ``docker-compose``
  package, 1.29) accepts it; every bind-mounted file exists; the admin port is not published.
- ``deploy/kubernetes/``: ``kubernetes-validate`` (PyPI, offline JSON schemas, ``--strict`` so an
  unknown or misspelt field fails) accepts every built-in resource against a pinned Kubernetes
  version. It has no schemas for custom resources, so the Prometheus Operator ``PodMonitor`` gets
  a small hand check instead (apiVersion, kind, selector, ``spec.podMetricsEndpoints``).
- Every ``tdproxy.yaml`` under ``deploy/``, including the one inside the ConfigMap, is a valid
  tdproxy config (``parse_config_text``), so renamed or removed keys cannot drift in unnoticed.
- The manifests fit together: selectors match the pod labels, probes and the PodMonitor use the
  admin port the config names, the Service exposes only the entrypoint, the ConfigMap is mounted
  as a directory (a ``subPath`` mount never receives ConfigMap updates, so live reload would
  silently stop), and the grace period outlasts ``preStop`` plus ``shutdown_grace``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tdproxy.config.loader import parse_config_text
from tdproxy.config.model import Config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
KUBERNETES_DIR = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "tdproxy-dashboard.json"

# A version whose schemas kubernetes-validate ships (1.37.0 ships 1.25 to 1.37); the oldest
# Kubernetes these manifests are meant for.
KUBERNETES_VERSION = "1.30.0"
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "PodMonitor")}
TOOL_TIMEOUT = 120


def _system_tool(command: str, package: str) -> str:
    """The path of ``command``. Missing: a skip for a non-root user (who cannot install it), a
    failure for root, since ``scripts/system-deps`` installs it there.
    """
    path = shutil.which(command)
    if path is not None:
        return path
    hint = (
        f"{command} is not installed (Debian package {package!r}; scripts/system-deps installs it)"
    )
    if os.geteuid() != 0:
        pytest.skip(hint)
    pytest.fail(hint)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _config(text: str, where: str) -> Config:
    return parse_config_text(text, where)


# ---------------------------------------------------------------------------------------------
# tdproxy configs everywhere under deploy/


def _deploy_configs() -> list[tuple[str, str]]:
    """(where, text) for every tdproxy.yaml file under deploy/ and every one inside a ConfigMap."""
    found = [
        (str(path.relative_to(REPO_ROOT)), path.read_text(encoding="utf-8"))
        for path in sorted(DEPLOY.rglob("tdproxy.yaml"))
    ]
    for path in sorted(KUBERNETES_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(document, dict) and document.get("kind") in ("ConfigMap", "Secret"):
                for key, text in (document.get("data") or {}).items():
                    if key == "tdproxy.yaml":
                        found.append((f"{path.relative_to(REPO_ROOT)} data[{key}]", text))
    return found


def test_there_are_configs_to_check() -> None:
    wheres = [where for where, _ in _deploy_configs()]
    assert any(where.startswith("deploy/compose/") for where in wheres), wheres
    assert any(where.startswith("deploy/kubernetes/") for where in wheres), wheres


@pytest.mark.parametrize(
    ("where", "text"), _deploy_configs(), ids=[where for where, _ in _deploy_configs()]
)
def test_every_deploy_config_is_a_valid_tdproxy_config(where: str, text: str) -> None:
    config = _config(text, where)
    # Inside a container or pod the admin port must be reachable from outside its loopback
    # (Prometheus, probes); each file says why next to the setting.
    assert config.admin.address == "0.0.0.0", where
    assert config.entrypoint.address == "0.0.0.0", where


# ---------------------------------------------------------------------------------------------
# docker-compose


def test_docker_compose_accepts_the_compose_file() -> None:
    compose = _system_tool("docker-compose", "docker-compose")
    result = _run([compose, "-f", str(COMPOSE_FILE), "config", "-q"])
    assert result.returncode == 0, result.stderr + result.stdout
    assert "ERROR" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as ``docker-compose config`` resolves it (anchors merged, paths made
    absolute), so the checks below see what Compose itself will run."""
    command = _system_tool("docker-compose", "docker-compose")
    result = _run([command, "-f", str(COMPOSE_FILE), "config"])
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert isinstance(resolved, dict)
    return resolved


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's bind mounts (long or short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
            if source.startswith(("/", ".")):
                mounts[target] = source
        elif volume.get("type") == "bind":
            mounts[volume["target"]] = volume["source"]
    return mounts


def _published_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host address, container port) of every port a service publishes."""
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published.append((str(port.get("host_ip", "")), int(port["target"])))
        else:
            parts = str(port).split(":")
            host_ip = parts[0] if len(parts) == 3 else ""
            published.append((host_ip, int(parts[-1].split("/")[0])))
    return published


def _argv(service: dict[str, Any]) -> list[str]:
    """What the container runs. The image's ENTRYPOINT is tdproxy itself, so a service that
    gives a whole command line must set ``entrypoint`` too, or it would run ``tdproxy tdproxy``.
    """
    entrypoint = service.get("entrypoint")
    assert entrypoint is not None, "set entrypoint: the image's own is /opt/tdproxy/bin/tdproxy"
    return [*entrypoint, *service["command"]]


def test_compose_has_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"tdproxy", "blue", "green", "prometheus", "grafana"}
    for name in ("tdproxy", "blue", "green"):
        assert services[name]["image"] == "tdproxy:latest", name
        assert Path(services[name]["build"]["context"]) == REPO_ROOT, name
    for name in ("blue", "green"):
        argv = _argv(services[name])
        assert argv[:2] == ["tdproxy", "demo-backend"], argv
        assert argv[argv.index("--name") + 1] == name
        # The image's HEALTHCHECK probes the admin port, which a demo backend does not serve.
        assert "/health" in " ".join(services[name]["healthcheck"]["test"])
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for target, source in _bind_mounts(service).items():
            assert Path(source).exists(), f"{name}: {source} (mounted at {target}) is missing"


def test_compose_tdproxy_config_fits_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    tdproxy = services["tdproxy"]
    mounts = _bind_mounts(tdproxy)
    # Mounted as a directory, so an edit that renames a new file over the old one is seen.
    assert "/etc/tdproxy" in mounts, mounts
    config_dir = Path(mounts["/etc/tdproxy"])
    assert config_dir.is_dir()
    assert tdproxy["environment"]["TDPROXY_CONFIG"] == "/etc/tdproxy/tdproxy.yaml"
    config_path = config_dir / "tdproxy.yaml"
    config = _config(config_path.read_text(encoding="utf-8"), str(config_path))
    assert {b.name: (b.host, b.port) for b in config.backends} == {
        "blue": ("blue", 8081),
        "green": ("green", 8081),
    }
    for name in ("blue", "green"):
        argv = _argv(services[name])
        assert argv[argv.index("--port") + 1] == "8081"
    assert config.health_check.path == "/health"  # the demo backend's health page
    assert config.timeouts.shutdown_grace < _seconds(tdproxy["stop_grace_period"])

    published = [port for _, port in _published_ports(tdproxy)]
    assert config.entrypoint.port in published
    assert config.admin.port not in published, "the admin port must not be published to the host"
    for name in ("prometheus", "grafana"):
        for host_ip, port in _published_ports(services[name]):
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond the host's loopback"


def _seconds(duration: str) -> float:
    """A compose duration such as ``30s`` or ``1m30s``."""
    total, number = 0.0, ""
    units = {"h": 3600, "m": 60, "s": 1}
    for char in duration:
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * units[char]
            number = ""
    return total + (float(number) if number else 0.0)


def test_prometheus_scrapes_the_admin_port(compose: dict[str, Any]) -> None:
    mounts = _bind_mounts(compose["services"]["prometheus"])
    prometheus = _load(Path(mounts["/etc/prometheus/prometheus.yml"]))
    config = _config((COMPOSE_DIR / "config" / "tdproxy.yaml").read_text(), "compose config")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    targets = [t for c in jobs["tdproxy"]["static_configs"] for t in c["targets"]]
    assert targets == [f"tdproxy:{config.admin.port}"]
    assert jobs["tdproxy"].get("metrics_path", "/metrics") == "/metrics"


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = _system_tool("promtool", "prometheus")
    result = _run([promtool, "check", "config", str(COMPOSE_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisions_the_datasource_and_the_dashboard(compose: dict[str, Any]) -> None:
    mounts = _bind_mounts(compose["services"]["grafana"])
    provisioning = Path(mounts["/etc/grafana/provisioning"])
    datasources = _load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert [(d["type"], d["url"], d["isDefault"]) for d in datasources] == [
        ("prometheus", "http://prometheus:9090", True)
    ]
    providers = _load(provisioning / "dashboards" / "tdproxy.yml")["providers"]
    (provider,) = providers
    dashboard_dir = provider["options"]["path"]
    dashboards = {
        target: source
        for target, source in mounts.items()
        if target.startswith(dashboard_dir.rstrip("/") + "/")
    }
    assert [Path(source) for source in dashboards.values()] == [DASHBOARD]


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _manifests() -> dict[str, dict[str, Any]]:
    """file name -> its one resource, for every manifest in deploy/kubernetes/."""
    found = {}
    for path in sorted(KUBERNETES_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        assert len(documents) == 1, f"{path.name}: one resource per file"
        found[path.name] = documents[0]
    return found


def _by_kind(kind: str) -> dict[str, Any]:
    (resource,) = [r for r in _manifests().values() if r["kind"] == kind]
    return resource


def _builtin_manifests() -> list[str]:
    return [
        name
        for name, resource in _manifests().items()
        if (resource["apiVersion"], resource["kind"]) not in CUSTOM_RESOURCES
    ]


def _kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.fail("kubernetes-validate is not installed: pip install -e '.[test]'")
    args = ["-k", KUBERNETES_VERSION, "--strict", "--quiet", str(path)]
    return _run([sys.executable, "-m", "kubernetes_validate", *args])


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load(KUBERNETES_DIR / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(_manifests())
    kinds = sorted(resource["kind"] for resource in _manifests().values())
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "PodDisruptionBudget", "PodMonitor", "Service"]
    )


@pytest.mark.parametrize("name", _builtin_manifests())
def test_kubernetes_validate_accepts(name: str) -> None:
    result = _kubernetes_validate(KUBERNETES_DIR / name)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Without a schema it would only warn and exit 0: make sure it really validated.
    assert "Couldn't find schema" not in output, output


def test_kubernetes_validate_rejects_a_misspelt_field(tmp_path: Path) -> None:
    """The check above is not vacuous: --strict fails an unknown field."""
    deployment = (KUBERNETES_DIR / "deployment.yaml").read_text(encoding="utf-8")
    assert "readOnlyRootFilesystem" in deployment
    broken = tmp_path / "deployment.yaml"
    broken.write_text(deployment.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"))
    result = _kubernetes_validate(broken)
    assert result.returncode != 0
    assert "readOnlyRootFileSystem" in result.stdout + result.stderr


def test_podmonitor_by_hand() -> None:
    """kubernetes-validate has no schemas for CRDs, so the PodMonitor is checked here."""
    monitor = _by_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) <= {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    assert _matches(spec["selector"]["matchLabels"], _pod_labels())
    endpoints = spec["podMetricsEndpoints"]
    assert endpoints, "spec.podMetricsEndpoints is empty"
    for endpoint in endpoints:
        assert endpoint["port"] == "admin"
        assert endpoint.get("path", "/metrics") == "/metrics"


def _pod_labels() -> dict[str, str]:
    labels: dict[str, str] = _by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _container() -> dict[str, Any]:
    (container,) = _by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _container_ports() -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in _container()["ports"]}


def _configmap_config() -> Config:
    configmap = _by_kind("ConfigMap")
    return _config(configmap["data"]["tdproxy.yaml"], "deploy/kubernetes ConfigMap")


def test_selectors_match_the_pods() -> None:
    deployment = _by_kind("Deployment")
    labels = _pod_labels()
    assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)
    assert _matches(_by_kind("Service")["spec"]["selector"], labels)
    assert _matches(_by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)


def test_ports_agree_with_the_config() -> None:
    config = _configmap_config()
    assert _container_ports() == {"http": config.entrypoint.port, "admin": config.admin.port}


def test_service_exposes_the_entrypoint_only() -> None:
    service = _by_kind("Service")
    ports = service["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in ports] == [(80, "http")]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_deployment_shape() -> None:
    deployment = _by_kind("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert _by_kind("PodDisruptionBudget")["spec"]["minAvailable"] == 1
    container = _container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind


def test_security_context() -> None:
    pod = _by_kind("Deployment")["spec"]["template"]["spec"]
    container = _container()["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The kubelet can only verify runAsNonRoot against a numeric user.
    assert pod["securityContext"]["runAsUser"] > 0
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_grace_period_outlasts_prestop_and_drain() -> None:
    pod = _by_kind("Deployment")["spec"]["template"]["spec"]
    command = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pause = float(command[1])
    assert pause >= 5, "endpoints need a few seconds to drop the pod before SIGTERM"
    shutdown_grace = _configmap_config().timeouts.shutdown_grace
    assert pod["terminationGracePeriodSeconds"] > pause + shutdown_grace


def test_configmap_is_mounted_as_a_directory() -> None:
    """A subPath mount is copied once at container start and never receives ConfigMap updates,
    so tdproxy would never see a change: the ConfigMap must be mounted as a whole directory."""
    pod = _by_kind("Deployment")["spec"]["template"]["spec"]
    configmap_name = _by_kind("ConfigMap")["metadata"]["name"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == configmap_name]
    container = _container()
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert "items" not in volume["configMap"]  # the key keeps its own name, tdproxy.yaml
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["TDPROXY_CONFIG"] == mount["mountPath"].rstrip("/") + "/tdproxy.yaml"
    assert "command" not in container and "args" not in container  # the image's `tdproxy run`
