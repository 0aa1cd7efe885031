"""How many cores ``run --processes auto`` may use: the CPU affinity, capped by the cgroup CPU quota.

``os.sched_getaffinity`` counts the cores the scheduler *may* place this process on, which in a
container is every core of the node: a pod with ``limits.cpu: 1`` on a 64-core node would start 64
pump processes, each throttled to a 64th of a core and all of them together past the memory limit.
The limit Kubernetes (and Docker, and Container Apps) sets is a CFS quota on the container's cgroup:

* cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` in microseconds, or ``"max <period>"`` (none);
* cgroup v1: ``cpu.cfs_quota_us`` (``-1``: none) over ``cpu.cfs_period_us``.

The cgroup is the one ``/proc/self/cgroup`` names, found under the mount that ``/proc/self/mountinfo``
lists for that hierarchy (``/sys/fs/cgroup`` on a v2 host, ``/sys/fs/cgroup/unified`` beside the v1
``cpu`` mount on a hybrid one). A container sees its own cgroup as the mount's root; a process in a
nested cgroup is bound by every ancestor's quota too, so the smallest along the path wins. Quotas are
rounded up (``1500m`` is two processes: the second one's work is still done, only throttled), never
below one and never above the affinity.

Everything here reads files under a ``root`` directory given by the caller, so tests build a fake
``/proc`` and ``/sys`` in a temporary directory. Anything missing or unreadable means "no limit known":
the count falls back to the affinity, which is what ``auto`` meant before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_V1_CONTROLLER = "cpu"

#: Reads one cgroup directory's quota in cores, or None when it sets none.
_QuotaReader = Callable[[Path], float | None]


@dataclass(frozen=True, slots=True)
class _Mount:
    """Where one cgroup hierarchy is mounted, and which of its cgroups the mount's root shows."""

    point: str
    root: str


def usable_cpus(root: Path = Path("/"), affinity: int | None = None) -> int:
    """The cores this process may use: ``affinity`` (default: the scheduler's) capped by the cgroup quota."""
    allowed = affinity if affinity is not None else len(os.sched_getaffinity(0))
    allowed = max(1, allowed)
    quota = cpu_quota(root)
    if quota is None:
        return allowed
    return max(1, min(allowed, math.ceil(quota)))


def cpu_quota(root: Path = Path("/")) -> float | None:
    """The CPU quota in cores of this process's cgroup (the smallest along its path), or None for none."""
    memberships = _read_lines(root / "proc/self/cgroup")
    if memberships is None:
        return None
    mounts = _cgroup_mounts(root)
    v1_path = _membership(memberships, v1=True)
    if v1_path is not None:
        # On a hybrid host the cpu controller lives in v1 and the unified tree has no cpu.max.
        mount = mounts.get("v1", _Mount("/sys/fs/cgroup/cpu", "/"))
        return _smallest(root, mount, v1_path, _v1_quota)
    v2_path = _membership(memberships, v1=False)
    if v2_path is not None:
        mount = mounts.get("v2", _Mount("/sys/fs/cgroup", "/"))
        return _smallest(root, mount, v2_path, _v2_quota)
    return None


def _membership(lines: list[str], *, v1: bool) -> str | None:
    """The cgroup path of the v1 ``cpu`` controller's line (``N:cpu,cpuacct:/path``) or of v2's ``0::/path``."""
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if v1 and _V1_CONTROLLER in controllers.split(","):
            return path
        if not v1 and hierarchy == "0" and controllers == "":
            return path
    return None


def _cgroup_mounts(root: Path) -> dict[str, _Mount]:
    """The v2 mount and the v1 mount carrying the cpu controller, from ``/proc/self/mountinfo``."""
    mounts: dict[str, _Mount] = {}
    for line in _read_lines(root / "proc/self/mountinfo") or []:
        # "<id> <parent> <major:minor> <root> <mount point> <options> [optional...] - <type> <source> <super options>"
        fields, _, tail = line.partition(" - ")
        before, after = fields.split(), tail.split()
        if len(before) < 5 or len(after) < 3:
            continue
        mount = _Mount(point=_unescape(before[4]), root=_unescape(before[3]))
        if after[0] == "cgroup2":
            mounts.setdefault("v2", mount)
        elif after[0] == "cgroup" and _V1_CONTROLLER in after[2].split(","):
            mounts.setdefault("v1", mount)
    return mounts


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as three-digit octal escapes."""
    for code in ("040", "011", "012", "134"):
        field = field.replace(f"\\{code}", chr(int(code, 8)))
    return field


def _smallest(root: Path, mount: _Mount, path: str, read: _QuotaReader) -> float | None:
    """The smallest quota from the process's cgroup directory up to the mount point."""
    top = root / mount.point.lstrip("/")
    relative = _relative(path, mount.root)
    directory = top / relative if relative is not None else top
    if not directory.is_dir():
        # The path is outside what this mount shows (a container without a cgroup namespace sees the
        # host's path, while its own cgroup is mounted as the root): the mount's root is ours.
        directory = top
    quotas: list[float] = []
    while True:
        quota = read(directory)
        if quota is not None:
            quotas.append(quota)
        if directory == top or top not in directory.parents:
            break
        directory = directory.parent
    return min(quotas, default=None)


def _relative(path: str, mount_root: str) -> str | None:
    """``path`` relative to the cgroup the mount's root shows, or None when it lies outside it."""
    path, mount_root = path.rstrip("/") or "/", mount_root.rstrip("/") or "/"
    if mount_root == "/":
        return path.lstrip("/")
    if path == mount_root:
        return ""
    if path.startswith(mount_root + "/"):
        return path[len(mount_root) + 1 :]
    return None


def _v2_quota(directory: Path) -> float | None:
    """``cpu.max``: ``"max 100000"`` is no limit, ``"150000 100000"`` is 1.5 cores."""
    lines = _read_lines(directory / "cpu.max")
    if not lines:
        return None
    fields = lines[0].split()
    if not fields or fields[0] == "max":
        return None
    period = fields[1] if len(fields) > 1 else "100000"
    return _ratio(fields[0], period)


def _v1_quota(directory: Path) -> float | None:
    """``cpu.cfs_quota_us`` (``-1``: no limit) over ``cpu.cfs_period_us``."""
    quota = _read_lines(directory / "cpu.cfs_quota_us")
    period = _read_lines(directory / "cpu.cfs_period_us")
    if not quota or not period:
        return None
    return _ratio(quota[0], period[0])


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


def _read_lines(path: Path) -> list[str] | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return None
