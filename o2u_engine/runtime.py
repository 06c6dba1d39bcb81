"""Facts about the machine (devices, CPUs, free memory) and process settings a caller may opt
into; nothing here runs at import time.

PyTorch sizes its CPU thread pool from the machine's core count, which in a container or under
`taskset` is often far more than the process may use; oversubscribed threads make CPU training
several times slower. `configure_cpu_threads` sets the pool from the cores actually available.
On a CPU shared with other busy processes, OpenMP's default spin-waiting makes it far worse
(measured: 2 threads on 2 contended cores trained at 90 instead of 950 images/s); a process that
runs the engine there should start with OMP_WAIT_POLICY=PASSIVE in its environment, which
OpenMP reads once, before torch is imported.
"""

from __future__ import annotations

import math
import os

import torch

from o2u_engine.errors import ConfigError

_CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2 quota, e.g. "200000 100000" = 2 CPUs
# cgroup v1: the quota and period in microseconds, in two files (a quota of -1 is none)
_CGROUP_V1_CPU = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")
_MEMINFO = "/proc/meminfo"
# The container's memory limit, usage and statistics: cgroup v2, then v1 (file names of each).
_CGROUP_MEMORY = (
    ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
    ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
)
_NO_CGROUP_V1_LIMIT = 2**62  # cgroup v1 writes "no limit" as a number near 2**63


def available_cpu_count() -> int:
    """CPUs this process may run on: its affinity mask, further capped by the container's CPU
    quota (cgroup v2, or v1), rounded up."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_cpu_quota() -> float | None:
    """The container's CPU limit in CPUs (quota / period), or None without one."""
    try:
        with open(_CGROUP_CPU_MAX, encoding="ascii") as stream:
            quota, period = stream.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        values = []
        for path in _CGROUP_V1_CPU:
            with open(path, encoding="ascii") as stream:
                values.append(int(stream.read()))
        quota_us, period_us = values
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def configure_cpu_threads(max_threads: int | None = None) -> int:
    """Set torch's intra-op thread count to the available CPUs (at most `max_threads`); returns it."""
    threads = available_cpu_count()
    if max_threads is not None:
        threads = max(1, min(threads, max_threads))
    torch.set_num_threads(threads)
    return threads


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device to run on, with an explicit index for CUDA (`cuda` -> `cuda:0`)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(
            f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}", field="device"
        ) from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device!r} requested but CUDA is not available", field="device")
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(
                f"device: expected cuda:0..cuda:{torch.cuda.device_count() - 1}", field="device"
            )
        return torch.device("cuda", index)
    if resolved.type != "cpu":
        raise ConfigError(f"device: expected 'cpu' or 'cuda[:N]', got {device!r}", field="device")
    return resolved


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 autocast speeds up convolutions on this CPU."""
    # AVX512-BF16/AMX CPUs run bf16 convolutions about twice as fast as fp32 (measured on a
    # Sapphire Rapids core); elsewhere bf16 is emulated and slower, so fp32 stays the default.
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if callable(probe) else False


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of `device` in bytes. For the CPU: the host's available memory (free plus the
    page cache the kernel can reclaim), capped by what the container's memory limit (cgroup v2
    or v1) leaves, since a container that passes its limit is killed whatever the host has free."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    host = _host_available_bytes()
    container = _cgroup_available_bytes()
    return host if container is None else min(host, container)


def _host_available_bytes() -> int:
    """The kernel's estimate of memory available without swapping (MemAvailable), else free pages."""
    try:
        with open(_MEMINFO, encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):  # not Linux: no figure, so the resident tensor is assumed to fit
        return 2**62


def _cgroup_available_bytes() -> int | None:
    """What this process's cgroup may still allocate: its memory limit less its usage, counting
    the inactive file cache as free (the kernel reclaims it before the limit is hit; the kubelet's
    working set is computed so). None when no limit is set or the files cannot be read."""
    for root, limit_name, usage_name, inactive_name in _CGROUP_MEMORY:
        try:
            with open(os.path.join(root, limit_name), encoding="ascii") as stream:
                limit_text = stream.read().strip()
            if limit_text == "max" or int(limit_text) >= _NO_CGROUP_V1_LIMIT:
                return None
            with open(os.path.join(root, usage_name), encoding="ascii") as stream:
                usage = int(stream.read())
            inactive = 0
            with open(os.path.join(root, "memory.stat"), encoding="ascii") as stream:
                for line in stream:
                    name, _, value = line.partition(" ")
                    if name == inactive_name:
                        inactive = int(value)
            return max(0, int(limit_text) - usage + inactive)
        except (OSError, ValueError):
            continue
    return None
