"""``workers: auto``: the CPU count from the affinity mask and a fake cgroup directory tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdproxy.workers.cpus import available_cpus, cgroup_cpu_limit

V2_MOUNTINFO = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTINFO = (
    "30 1 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    "31 1 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
)


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2(root: Path, path: str, limits: dict[str, str]) -> Path:
    write(root, "proc/self/cgroup", f"0::{path}\n")
    write(root, "proc/self/mountinfo", V2_MOUNTINFO)
    for directory, cpu_max in limits.items():
        write(root, f"sys/fs/cgroup{directory}/cpu.max", cpu_max + "\n")
    return root


def eight_cpus() -> int:
    return 8


def test_no_quota_means_the_affinity_mask(tmp_path: Path) -> None:
    v2(tmp_path, "/app", {"/app": "max 100000"})
    assert cgroup_cpu_limit(tmp_path) is None
    assert available_cpus(str(tmp_path), eight_cpus) == 8


def test_a_v2_quota_limits_the_count_and_rounds_up(tmp_path: Path) -> None:
    v2(tmp_path, "/app", {"/app": "150000 100000"})
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert available_cpus(str(tmp_path), eight_cpus) == 2


def test_a_parent_cgroup_quota_binds_its_children(tmp_path: Path) -> None:
    v2(
        tmp_path,
        "/kubepods/pod1/app",
        {"/kubepods/pod1": "300000 100000", "/kubepods/pod1/app": "max 100000"},
    )
    assert available_cpus(str(tmp_path), eight_cpus) == 3


def test_the_smaller_of_affinity_and_quota_wins(tmp_path: Path) -> None:
    v2(tmp_path, "/app", {"/app": "400000 100000"})
    assert available_cpus(str(tmp_path), lambda: 2) == 2


def test_a_tiny_quota_still_gives_one_worker(tmp_path: Path) -> None:
    v2(tmp_path, "/app", {"/app": "10000 100000"})
    assert available_cpus(str(tmp_path), eight_cpus) == 1


def test_inside_a_cgroup_namespace_the_path_is_the_mount_root(tmp_path: Path) -> None:
    # A container with its own cgroup namespace sees itself at "/" of the mount.
    v2(tmp_path, "/", {"": "200000 100000"})
    assert available_cpus(str(tmp_path), eight_cpus) == 2


def test_a_mount_rooted_at_the_container_cgroup(tmp_path: Path) -> None:
    # Without a cgroup namespace, the mount's root is the container's cgroup.
    write(tmp_path, "proc/self/cgroup", "0::/docker/abc\n")
    write(
        tmp_path,
        "proc/self/mountinfo",
        "30 1 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
    )
    write(tmp_path, "sys/fs/cgroup/cpu.max", "100000 100000\n")
    assert available_cpus(str(tmp_path), eight_cpus) == 1


def test_a_v1_cfs_quota(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "5:memory:/app\n4:cpu,cpuacct:/app\n")
    write(tmp_path, "proc/self/mountinfo", V1_MOUNTINFO)
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/app/cpu.cfs_quota_us", "250000\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/app/cpu.cfs_period_us", "100000\n")
    assert available_cpus(str(tmp_path), eight_cpus) == 3


def test_a_v1_quota_of_minus_one_is_none(tmp_path: Path) -> None:
    write(tmp_path, "proc/self/cgroup", "4:cpu,cpuacct:/\n")
    write(tmp_path, "proc/self/mountinfo", V1_MOUNTINFO)
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert available_cpus(str(tmp_path), eight_cpus) == 8


@pytest.mark.parametrize("cpu_max", ["", "garbage", "100000", "abc 100000", "100000 0"])
def test_unreadable_quota_files_are_ignored(tmp_path: Path, cpu_max: str) -> None:
    v2(tmp_path, "/app", {"/app": cpu_max})
    assert available_cpus(str(tmp_path), eight_cpus) == 8


def test_no_cgroup_files_at_all(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None
    assert available_cpus(str(tmp_path), eight_cpus) == 8


def test_this_machine_gives_at_least_one() -> None:
    assert available_cpus() >= 1
