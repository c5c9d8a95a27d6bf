"""What the hardware computes fast (used to choose reduced precision only where it is native), and handing
freed memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

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
