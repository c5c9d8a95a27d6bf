"""What the hardware computes fast (used to choose reduced precision only where it is native), how busy it
is, and handing freed memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX, which make bfloat16 products two to three times faster than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
        library.malloc_trim  # noqa: B018 (present in glibc only)
    except (OSError, AttributeError):
        return None
    return library


def release_free_memory() -> None:
    """Hand memory that the C allocator keeps after large temporary computations back to the system.

    glibc keeps freed blocks below its mapping threshold in per-thread heaps, so a burst of temporaries
    (building a batched graph, say) can leave the process a gigabyte larger than what it holds. Elsewhere
    (other C libraries, other systems) this does nothing.
    """
    library = _glibc()
    if library is not None:
        library.malloc_trim(0)


def busy_cores_elsewhere(interval: float = 0.05) -> float:
    """How many cores other processes kept busy over the next ``interval`` seconds, from the kernel's CPU
    counters (Linux; 0 where they cannot be read)."""
    try:
        busy_before, own_before = _busy_ticks(), _own_ticks()
        time.sleep(interval)
        busy_after, own_after = _busy_ticks(), _own_ticks()
    except (OSError, ValueError, IndexError):
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK") * interval
    return max(0.0, ((busy_after - busy_before) - (own_after - own_before)) / ticks)


def _busy_ticks() -> int:
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def _own_ticks() -> int:
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@contextmanager
def threads_for_load() -> Iterator[int]:
    """Context (or decorator): use no more intra-op threads than there are cores left idle by other processes
    (at least one), and yields that number; the previous setting comes back on exit.

    A busy loop beside a run that keeps a thread per core makes every parallel operation wait at its end for
    a thread the scheduler has set aside, which slows a run of many such operations several times over;
    leaving the busy core alone costs only that core's share.
    """
    before = torch.get_num_threads()
    free = os.cpu_count() or before
    wanted = max(1, min(before, int(free - busy_cores_elsewhere() + 0.5)))
    if wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        if wanted != before:
            torch.set_num_threads(before)
