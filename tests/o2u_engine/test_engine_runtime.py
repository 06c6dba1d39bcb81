"""Facts about the machine (o2u_engine.runtime): the host memory a CPU run may use is the host's
available memory within the container's memory limit (cgroup v2 or v1), and the resident data of
CPU workers that share it is sized for all of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from o2u_engine import O2UConfig, resolve, resolve_config, runtime

CPU = torch.device("cpu")
MIB = 2**20


def _files(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host with 8,000 MiB available and, until a test writes some, no cgroup files."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {16000 * 1024} kB\nMemAvailable:   {8000 * 1024} kB\n")
    monkeypatch.setattr(runtime, "_MEMINFO", str(meminfo))
    v2, v1 = tmp_path / "cgroup", tmp_path / "cgroup" / "memory"
    monkeypatch.setattr(
        runtime,
        "_CGROUP_MEMORY",
        (
            (str(v2), "memory.max", "memory.current", "inactive_file"),
            (str(v1), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
        ),
    )
    return tmp_path


def test_without_a_container_limit_the_hosts_available_memory_counts(host: Path) -> None:
    assert runtime.free_memory_bytes(CPU) == 8000 * MIB
    _files(host / "cgroup", {"memory.max": "max\n", "memory.current": f"{100 * MIB}\n", "memory.stat": ""})
    assert runtime.free_memory_bytes(CPU) == 8000 * MIB
    v1 = {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "1\n", "memory.stat": ""}
    (host / "cgroup" / "memory.max").unlink()
    _files(host / "cgroup" / "memory", v1)  # cgroup v1 writes "no limit" as a number
    assert runtime.free_memory_bytes(CPU) == 8000 * MIB


def test_a_cgroup_v2_limit_caps_it_with_the_reclaimable_cache_counted_free(host: Path) -> None:
    stat = f"anon {700 * MIB}\nfile {300 * MIB}\ninactive_file {100 * MIB}\nactive_file {200 * MIB}\n"
    limits = {"memory.max": f"{1024 * MIB}\n", "memory.current": f"{1000 * MIB}\n", "memory.stat": stat}
    _files(host / "cgroup", limits)
    assert runtime.free_memory_bytes(CPU) == (1024 - 1000 + 100) * MIB


def test_a_cgroup_v1_limit_caps_it(host: Path) -> None:
    stat = f"cache {50 * MIB}\ninactive_file {1 * MIB}\ntotal_inactive_file {40 * MIB}\n"
    v1 = {
        "memory.limit_in_bytes": f"{2048 * MIB}\n",
        "memory.usage_in_bytes": f"{548 * MIB}\n",
        "memory.stat": stat,
    }
    _files(host / "cgroup" / "memory", v1)
    assert runtime.free_memory_bytes(CPU) == (2048 - 548 + 40) * MIB


def test_a_container_over_its_limit_has_nothing_free(host: Path) -> None:
    stat = "inactive_file 0\n"
    _files(
        host / "cgroup", {"memory.max": f"{512 * MIB}", "memory.current": f"{600 * MIB}", "memory.stat": stat}
    )
    assert runtime.free_memory_bytes(CPU) == 0


def test_cpu_workers_sharing_the_host_split_the_resident_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 x 512 float32 features (3.9 MiB) resident in half of 10 MiB free: one worker keeps them
    resident, two workers (a copy each) stream them."""
    monkeypatch.setattr(resolve, "free_memory_bytes", lambda device: 10 * MIB)

    def placement(workers: int) -> str:
        shape = (512,)
        resolved = resolve_config(
            O2UConfig(), num_samples=2000, sample_shape=shape, num_classes=10, device="cpu", workers=workers
        )
        return resolved.data_placement

    assert [placement(1), placement(2)] == ["resident", "streamed"]


@pytest.fixture
def eight_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A process allowed on 8 CPUs, with no CPU quota until a test writes one."""
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(runtime, "_CGROUP_CPU_MAX", str(tmp_path / "cpu.max"))
    monkeypatch.setattr(runtime, "_CGROUP_V1_CPU", (str(tmp_path / "quota_us"), str(tmp_path / "period_us")))
    return tmp_path


def test_the_cpu_count_is_the_affinity_without_a_quota(eight_cpus: Path) -> None:
    assert runtime.available_cpu_count() == 8
    (eight_cpus / "quota_us").write_text("-1\n")  # cgroup v1: no quota
    (eight_cpus / "period_us").write_text("100000\n")
    assert runtime.available_cpu_count() == 8
    (eight_cpus / "cpu.max").write_text("max 100000\n")
    assert runtime.available_cpu_count() == 8


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: 1.5 CPUs, rounded up
        ({"quota_us": "300000\n", "period_us": "100000\n"}, 3),  # cgroup v1
        ({"quota_us": "5000\n", "period_us": "100000\n"}, 1),  # at least one
        ({"cpu.max": "1600000 100000\n"}, 8),  # never more than the affinity
    ],
    ids=["v2", "v1", "a fraction of one", "above the affinity"],
)
def test_a_container_cpu_quota_caps_the_count(eight_cpus: Path, files: dict[str, str], expected: int) -> None:
    _files(eight_cpus, files)
    assert runtime.available_cpu_count() == expected
