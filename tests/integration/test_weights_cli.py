"""``tdproxy weights``, ``weights set`` and ``weights swap`` as real processes, against real files
and a running ``tdproxy run``."""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path

import pytest

from tests.fakes import client
from tests.fakes.process import (
    BackendProcess,
    ProxyFactory,
    ProxyProcess,
    free_port,
    proxy_config,
    run_tdproxy,
)

THREE = """\
# three environments
backends:
  - name: blue
    url: http://127.0.0.1:1
    weight: 50
  - name: green
    url: http://127.0.0.1:2
    weight: 30
  - name: red
    url: http://127.0.0.1:3
    weight: 20
  - name: spare
    url: http://127.0.0.1:4
    backup: true
admin:
  port: {admin_port}
"""

TWO = """\
# two environments and a backup
backends:
  - name: blue
    url: http://127.0.0.1:1
    weight: 70
  - name: green
    url: http://127.0.0.1:2
    weight: 30
  - name: spare
    url: http://127.0.0.1:4
    backup: true
admin:
  port: {admin_port}
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """Two environments 70/30 and a backup; the admin port is one nothing listens on."""
    path = tmp_path / "tdproxy.yaml"
    path.write_text(TWO.format(admin_port=free_port()), encoding="utf-8")
    return path


def weights(*args: str, config: Path) -> tuple[int, str, str]:
    result = run_tdproxy("weights", *args, "--config", str(config))
    return result.returncode, result.stdout, result.stderr


def fingerprint(path: Path) -> tuple[bytes, int, int]:
    info = os.stat(path)
    return path.read_bytes(), info.st_mtime_ns, info.st_ino


def served_by(proxy: ProxyProcess, count: int) -> Counter[str | None]:
    return Counter(client.request(proxy.url + "/").header("X-Backend") for _ in range(count))


def test_show_lists_weight_share_and_backup(config_file: Path) -> None:
    code, out, _ = weights(config=config_file)
    assert code == 0
    assert out.splitlines() == [
        "blue   weight 70  70%",
        "green  weight 30  30%",
        "spare  weight 1   backup",
    ]


def test_set_against_a_running_proxy_is_applied_and_serves_the_new_split(
    proxy_factory: ProxyFactory, blue: BackendProcess, green: BackendProcess
) -> None:
    proxy = proxy_factory(
        proxy_config([("blue", blue.url, 50), ("green", green.url, 50)]), wait_admin=True
    )
    assert served_by(proxy, 4) == {"blue": 2, "green": 2}

    code, out, err = weights("set", "blue=0", "green=100", config=proxy.config_path)
    assert code == 0, err
    assert out.splitlines() == [
        "blue   50% -> 0%",
        "green  50% -> 100%",
        "applied by the running proxy (generation 2)",
    ]
    assert served_by(proxy, 6) == {"green": 6}

    code, out, err = weights("swap", config=proxy.config_path)
    assert code == 0, err
    assert out.splitlines()[-1] == "applied by the running proxy (generation 3)"
    assert served_by(proxy, 6) == {"blue": 6}


def test_without_a_running_proxy_it_says_the_proxy_picks_the_file_up(config_file: Path) -> None:
    code, out, err = weights("set", "blue=40", "green=60", config=config_file)
    assert code == 0, err
    assert out.splitlines()[:3] == ["blue   70% -> 40%", "green  30% -> 60%", "spare  backup"]
    assert "a running tdproxy applies the file by itself" in out.splitlines()[3]
    assert "    weight: 40\n" in config_file.read_text() and "weight: 60" in config_file.read_text()


def test_a_change_to_the_same_weights_leaves_the_file_alone(config_file: Path) -> None:
    before = fingerprint(config_file)
    code, out, _ = weights("set", "blue=70", config=config_file)
    assert code == 0
    assert out.splitlines()[-1] == "no change: the file is left as it is"
    assert fingerprint(config_file) == before


def test_the_default_path_comes_from_tdproxy_config(config_file: Path) -> None:
    result = run_tdproxy("weights", "swap", env={"TDPROXY_CONFIG": str(config_file)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("blue   70% -> 30%")


def test_mode_is_kept_and_the_file_is_replaced_not_rewritten(config_file: Path) -> None:
    config_file.chmod(0o640)
    inode = os.stat(config_file).st_ino
    code, _, err = weights("set", "green=10", config=config_file)
    assert code == 0, err
    assert stat.S_IMODE(os.stat(config_file).st_mode) == 0o640
    assert os.stat(config_file).st_ino != inode  # renamed over: readers see old or new, no mix
    assert sorted(p.name for p in config_file.parent.iterdir()) == ["tdproxy.yaml"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_owner_and_group_are_kept(config_file: Path) -> None:
    os.chown(config_file, 4321, 4322)
    code, _, err = weights("set", "green=10", config=config_file)
    assert code == 0, err
    info = os.stat(config_file)
    assert (info.st_uid, info.st_gid) == (4321, 4322)


ALIASED = """\
backends:
  - &blue
    name: blue
    url: http://127.0.0.1:1
    weight: &w 70
  - <<: *blue
    name: green
    url: http://127.0.0.1:2
  - name: red
    url: http://127.0.0.1:3
    weight: *w
admin:
  port: {admin_port}
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("set", "red=5"), "backend red: its weight is an alias (*w)"),
        (("set", "blue=5", "green=5"), "backend blue: its weight carries the anchor &w"),
    ],
)
def test_weights_shared_through_anchors_are_refused(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    path = tmp_path / "aliased.yaml"
    path.write_text(ALIASED.format(admin_port=free_port()), encoding="utf-8")
    before = fingerprint(path)
    code, _, err = weights(*args, config=path)
    assert code == 2
    assert message in err
    assert fingerprint(path) == before


def test_a_weight_another_backend_inherits_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "merged.yaml"
    path.write_text(
        ALIASED.replace("&w 70", "70")
        .replace("weight: *w", "weight: 1")
        .format(admin_port=free_port()),
        encoding="utf-8",
    )
    before = fingerprint(path)
    code, _, err = weights("set", "blue=5", config=path)
    assert code == 2
    assert "backend green: its weight would become 5 rather than 70" in err
    assert fingerprint(path) == before

    code, _, err = weights("set", "green=30", config=path)  # green gets a weight of its own
    assert code == 0, err
    assert "    url: http://127.0.0.1:2\n    weight: 30\n" in path.read_text()


def test_a_symlink_is_followed_and_stays_a_link(tmp_path: Path, config_file: Path) -> None:
    link = tmp_path / "link.yaml"
    link.symlink_to(config_file.name)
    code, _, err = weights("set", "blue=3", config=link)
    assert code == 0, err
    assert link.is_symlink() and "weight: 3\n" in config_file.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("set", "blue=0", "green=0", "spare=0"), "at least one backend needs a weight above 0"),
        (("set", "purple=1"), "unknown backend 'purple' (the backends are blue, green, spare)"),
        (("set", "blue=1000001"), "the weight must be a whole number from 0 to 1000000"),
        (("set", "blue=x"), "the weight must be a whole number"),
    ],
)
def test_an_invalid_change_exits_2_and_leaves_the_file_untouched(
    config_file: Path, args: tuple[str, ...], message: str
) -> None:
    before = fingerprint(config_file)
    code, out, err = weights(*args, config=config_file)
    assert code == 2
    assert message in err and "the file is unchanged" in err
    assert out == ""
    assert fingerprint(config_file) == before


def test_swap_with_three_backends_exits_2_naming_them(tmp_path: Path) -> None:
    path = tmp_path / "three.yaml"
    path.write_text(THREE.format(admin_port=free_port()), encoding="utf-8")
    before = fingerprint(path)
    code, _, err = weights("swap", config=path)
    assert code == 2
    assert "swap needs exactly two non-backup backends; the config has 3: blue, green, red" in err
    assert fingerprint(path) == before


def test_a_read_only_file_exits_1_with_the_kubectl_hint(config_file: Path) -> None:
    config_file.chmod(0o444)
    before = fingerprint(config_file)
    code, out, err = weights("set", "blue=0", "green=100", config=config_file)
    assert code == 1
    assert "cannot write" in err and "the file is read-only" in err
    assert "change the ConfigMap instead" in err
    assert "  kubectl edit configmap <configmap>\n" in err
    assert "  tdproxy weights set blue=0 green=100 --config tdproxy.yaml\n" in err
    assert "| kubectl apply -f -" in err
    assert out == "" and fingerprint(config_file) == before


def test_a_file_in_a_read_only_directory_exits_1(tmp_path: Path, config_file: Path) -> None:
    before = fingerprint(config_file)
    tmp_path.chmod(0o555)
    try:
        code, _, err = weights("swap", config=config_file)
    finally:
        tmp_path.chmod(0o755)
    assert code == 1
    assert f"its directory {tmp_path} is read-only" in err and "kubectl" in err
    assert fingerprint(config_file) == before


def test_a_configmap_mount_exits_1_and_says_to_change_the_configmap(tmp_path: Path) -> None:
    # What the kubelet makes: tdproxy.yaml -> ..data/tdproxy.yaml, ..data -> ..<timestamp>
    mount = tmp_path / "etc-tdproxy"
    version = mount / "..2024_05_01_10_00_00.123456789"
    version.mkdir(parents=True)
    (version / "tdproxy.yaml").write_text(TWO.format(admin_port=free_port()), encoding="utf-8")
    (mount / "..data").symlink_to(version.name)
    (mount / "tdproxy.yaml").symlink_to("..data/tdproxy.yaml")
    before = fingerprint(version / "tdproxy.yaml")

    code, _, err = weights("swap", config=mount / "tdproxy.yaml")
    assert code == 1
    assert "mounted from a Kubernetes ConfigMap" in err
    assert "Change the ConfigMap instead" in err
    assert "  kubectl edit configmap <configmap>\n" in err
    assert fingerprint(version / "tdproxy.yaml") == before
    assert sorted(p.name for p in version.iterdir()) == ["tdproxy.yaml"]
