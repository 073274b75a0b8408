"""``workers: auto``: how many CPUs this process may use.

Two limits apply, and the smaller wins:

- the CPU affinity mask (``os.sched_getaffinity``: ``taskset``, ``docker --cpuset-cpus``,
  Kubernetes' static CPU manager);
- the CPU bandwidth quota of the process's cgroup (``docker --cpus``, Kubernetes CPU limits):
  cgroup v2 ``cpu.max`` (``"200000 100000"`` = 2 CPUs, ``"max 100000"`` = none), or cgroup v1
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1 = none). A fractional quota
  rounds up (1.5 CPUs -> 2 workers: the second one still gets half a CPU of work done).

The quota of every cgroup from the process's own up to the mount point counts, since a parent's
limit binds its children. The cgroup files are found through ``/proc/self/cgroup`` and
``/proc/self/mountinfo``; ``root`` lets tests point all of that at a fake directory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

# A cgroup path as /proc/self/cgroup gives it, and the mount it lives under.
_Mount = tuple[str, str]  # (root within the hierarchy, mount point)


def available_cpus(root: str = "/", affinity: Callable[[], int] | None = None) -> int:
    """CPUs this process may use: the affinity mask and the cgroup quota, at least 1."""
    count = affinity() if affinity is not None else _affinity_count()
    quota = cgroup_cpu_limit(Path(root))
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: Path) -> float | None:
    """The CPU quota (in CPUs, may be fractional) binding this process, or None without one."""
    cgroups = _read(root / "proc/self/cgroup")
    mountinfo = _read(root / "proc/self/mountinfo")
    if cgroups is None:
        return None
    limits: list[float] = []
    for line in cgroups.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not hierarchy or not path:
            continue
        if hierarchy == "0" and controllers == "":
            mount = _find_mount(mountinfo, "cgroup2", None)
            directory = _cgroup_dir(root, mount, path, "/sys/fs/cgroup")
            limits += _walk(directory, root, mount, _v2_quota)
        elif "cpu" in controllers.split(","):
            mount = _find_mount(mountinfo, "cgroup", "cpu")
            directory = _cgroup_dir(root, mount, path, "/sys/fs/cgroup/cpu")
            limits += _walk(directory, root, mount, _v1_quota)
    return min(limits) if limits else None


def _find_mount(mountinfo: str | None, fstype: str, controller: str | None) -> _Mount | None:
    """(root, mount point) of the first mount of ``fstype`` (v1: carrying ``controller``)."""
    for line in (mountinfo or "").splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if not after or after[0] != fstype:
            continue
        options = after[2].split(",") if len(after) > 2 else []
        if controller is not None and controller not in options:
            continue
        return fields[3], _unescape(fields[4])
    return None


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def _cgroup_dir(root: Path, mount: _Mount | None, path: str, default: str) -> Path:
    """The directory of cgroup ``path``: under the mount point, relative to the mount's root
    (inside a container the mount's root is the container's own cgroup)."""
    mount_root, mount_point = mount if mount is not None else ("/", default)
    relative = path
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        relative = path[len(mount_root) :]
    return root / mount_point.lstrip("/") / relative.lstrip("/")


def _walk(
    directory: Path, root: Path, mount: _Mount | None, quota: Callable[[Path], float | None]
) -> list[float]:
    """The quota of ``directory`` and of every parent up to the mount point."""
    top = root / (mount[1] if mount is not None else "/sys/fs/cgroup").lstrip("/")
    limits = []
    current = directory
    while True:
        limit = quota(current)
        if limit is not None:
            limits.append(limit)
        if current == top or top not in current.parents:
            return limits
        current = current.parent


def _v2_quota(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if text is None:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _ratio(quota.strip(), period.strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:  # -1: no quota
        return None
    return q / p


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
