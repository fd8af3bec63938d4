"""What a merge runs on: the device, the CPUs it may use, torch's compute threads, page cache room."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.prefetch import mem_available


def resolve_device(device: str) -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; other names as given.

    Raises:
        ConfigError: cuda was asked for but is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota if set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


def default_threads() -> int:
    """Compute threads of a CPU merge when the spec sets none: :func:`usable_cpus` less two (the
    reader and writer threads), at least 1."""
    return max(1, usable_cpus() - 2)


@contextmanager
def compute_threads(device: torch.device, threads: int | None) -> Iterator[int]:
    """torch's intra-op threads for the duration of a CPU merge, restored afterwards; yields the
    count (``threads``, else :func:`default_threads`). On other devices nothing changes.

    More threads than free cores make OpenMP workers spin against the I/O threads, which costs more
    than they compute. The count can change the last bit of the pass-1 sums (BLAS splits dot
    products per thread), so a run is reproducible for a fixed count.
    """
    if device.type != "cpu":
        yield torch.get_num_threads()
        return
    n = threads or default_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def page_cache_budget() -> int:
    """Bytes of page cache a merge may fill with one tensor read twice: half the memory the
    kernel reports available (``MemAvailable``), 0 where it cannot be told."""
    return (mem_available() or 0) // 2


def threads_beside_evaluation(threads: int | None, norm_precision: str) -> int | None:
    """torch threads for a merge whose perplexity is evaluated in the same process (a gated stream,
    a sweep): ``threads`` when given; else every usable CPU where ``d`` does not depend on the count
    (``float64`` norms), so that the evaluation runs at full speed between merges; else None (the
    merge's default, which float32 norms depend on)."""
    if threads is None and norm_precision == "float64":
        return usable_cpus()
    return threads
