"""What the hardware computes fast: used to choose reduced precision only where it is native."""

from __future__ import annotations

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
