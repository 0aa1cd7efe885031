"""``--processes auto`` counts the container's CPU limit (its cgroup quota), not the node's cores.

Each test builds a fake ``/proc/self`` and ``/sys/fs/cgroup`` under ``tmp_path`` in the shapes the
kernel writes them: a pod on a cgroup v2 node (with and without a cgroup namespace), a nested cgroup
whose parent holds the limit, a cgroup v1 node and a hybrid host like this development machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.service import supervisor
from worker.service.cpus import cpu_quota, usable_cpus
from worker.service.supervisor import process_count

#: A pod's cgroup as the kubelet names it on a systemd node.
POD = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-abc.scope"
V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate"


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def v2_container(root: Path, cpu_max: str | None, *, namespaced: bool = True) -> None:
    """A container on a cgroup v2 node: with a cgroup namespace it sees itself as ``/``."""
    write(root, "proc/self/cgroup", "0::/\n" if namespaced else f"0::{POD}\n")
    mount_root = "/" if namespaced else POD
    write(root, "proc/self/mountinfo", V2_MOUNT.replace(" / /sys", f" {mount_root} /sys") + "\n")
    if cpu_max is not None:
        write(root, "sys/fs/cgroup/cpu.max", cpu_max + "\n")


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("100000 100000", 1),  # limits.cpu: 1
        ("150000 100000", 2),  # 1500m: rounded up, the second process is throttled, not starved
        ("50000 100000", 1),  # 500m: never below one
        ("400000 100000", 4),
        ("max 100000", 64),  # no limit: the affinity
        ("200000 50000", 4),  # a period other than the default
    ],
)
def test_cgroup_v2_quota_caps_the_affinity(tmp_path: Path, cpu_max: str, expected: int) -> None:
    """``cpu.max`` quota / period, rounded up, from 1 to the affinity (64 node cores here)."""
    v2_container(tmp_path, cpu_max)
    assert usable_cpus(tmp_path, affinity=64) == expected


def test_quota_above_the_affinity_is_capped_by_the_affinity(tmp_path: Path) -> None:
    """An 8-core quota on a process pinned to 2 cores still runs 2 processes."""
    v2_container(tmp_path, "800000 100000")
    assert usable_cpus(tmp_path, affinity=2) == 2


def test_without_a_cgroup_namespace_the_path_is_translated_through_mountinfo(tmp_path: Path) -> None:
    """``/proc/self/cgroup`` names the host path; the mount's root is that same cgroup, so cpu.max is at the top."""
    v2_container(tmp_path, "200000 100000", namespaced=False)
    assert cpu_quota(tmp_path) == 2.0
    assert usable_cpus(tmp_path, affinity=32) == 2


def test_a_nested_cgroup_is_bound_by_its_parents_quota(tmp_path: Path) -> None:
    """The smallest quota from the process's cgroup up to the mount wins (the pod limit above the container's)."""
    pod = POD.rsplit("/", 1)[0]
    write(tmp_path, "proc/self/cgroup", f"0::{POD}\n")
    write(tmp_path, "proc/self/mountinfo", V2_MOUNT + "\n")
    write(tmp_path, f"sys/fs/cgroup{POD}/cpu.max", "max 100000\n")
    write(tmp_path, f"sys/fs/cgroup{pod}/cpu.max", "300000 100000\n")
    write(tmp_path, "sys/fs/cgroup/kubepods.slice/cpu.max", "max 100000\n")
    assert usable_cpus(tmp_path, affinity=16) == 3
    # And the child's own, smaller quota wins over a larger parent's.
    write(tmp_path, f"sys/fs/cgroup{POD}/cpu.max", "120000 100000\n")
    assert cpu_quota(tmp_path) == pytest.approx(1.2)
    assert usable_cpus(tmp_path, affinity=16) == 2


@pytest.mark.parametrize(("quota", "expected"), [("-1", 48), ("100000", 1), ("250000", 3)])
def test_cgroup_v1_cfs_quota(tmp_path: Path, quota: str, expected: int) -> None:
    """v1: ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``; -1 is no limit. The mount is found by its cpu option."""
    write(tmp_path, "proc/self/cgroup", f"4:memory:{POD}\n3:cpu,cpuacct:{POD}\n1:name=systemd:{POD}\n")
    write(
        tmp_path,
        "proc/self/mountinfo",
        "25 20 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n"
        f"28 25 0:25 {POD} /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n",
    )
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", quota + "\n")
    write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert usable_cpus(tmp_path, affinity=48) == expected


def test_hybrid_host_reads_the_v1_cpu_controller(tmp_path: Path) -> None:
    """Both hierarchies mounted (v2 under ``unified``): the cpu controller is v1's, so its quota counts."""
    write(tmp_path, "proc/self/cgroup", "4:memory:/x\n1:cpu:/\n0::/\n")
    write(
        tmp_path,
        "proc/self/mountinfo",
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
    )
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "200000\n")
    write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    write(tmp_path, "sys/fs/cgroup/unified/cpu.max", "100000 100000\n")  # not the cpu controller's
    assert usable_cpus(tmp_path, affinity=8) == 2


def test_a_mount_path_with_a_space_is_unescaped(tmp_path: Path) -> None:
    """mountinfo writes a space as ``\\040``."""
    write(tmp_path, "proc/self/cgroup", "0::/\n")
    write(tmp_path, "proc/self/mountinfo", "30 23 0:26 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n")
    write(tmp_path, "sys/fs/my cgroup/cpu.max", "100000 100000\n")
    assert usable_cpus(tmp_path, affinity=8) == 1


@pytest.mark.parametrize(
    "files",
    [
        {},  # not Linux, or /proc not mounted
        {"proc/self/cgroup": "0::/\n"},  # no mountinfo, no cpu.max
        {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "garbage\n"},
        {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "0 100000\n"},
        {"proc/self/cgroup": "1:cpu:/\n", "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "100000\n"},  # no period
    ],
    ids=["nothing", "no-cpu-max", "garbage", "zero-quota", "no-period"],
)
def test_anything_unreadable_means_the_affinity(tmp_path: Path, files: dict[str, str]) -> None:
    """A missing, unreadable or malformed cgroup falls back to the affinity, as ``auto`` did before."""
    for relative, text in files.items():
        write(tmp_path, relative, text)
    assert cpu_quota(tmp_path) is None
    assert usable_cpus(tmp_path, affinity=6) == 6


def test_mountinfo_defaults_when_it_is_missing(tmp_path: Path) -> None:
    """Without mountinfo the conventional mount points are used (``/sys/fs/cgroup`` for v2)."""
    write(tmp_path, "proc/self/cgroup", "0::/\n")
    write(tmp_path, "sys/fs/cgroup/cpu.max", "200000 100000\n")
    assert usable_cpus(tmp_path, affinity=8) == 2


def test_processes_auto_uses_the_quota_aware_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--processes auto`` resolves through :func:`usable_cpus` (a pod limited to 3 cores gets 3 processes)."""
    monkeypatch.setattr(supervisor, "usable_cpus", lambda: 3)
    assert process_count("auto") == 3
    assert process_count("2") == 2
