"""What the CPU-kernel tests share: the kernels (or None where they cannot load), the skip mark, and the
tolerances a kernel is held to against the torch op it replaces. float32 agrees to float32 rounding (the
kernels sum in another order); bfloat16 to one bfloat16 rounding step of the output (2^-8 relative), as two
correct bfloat16 implementations do."""

from __future__ import annotations

import pytest
import torch

from trtllm_peft.executor.torch import cpu_kernels

KERNELS = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"CPU kernels: {cpu_kernels.why_unavailable()}")
DTYPES = [torch.float32, torch.bfloat16]
REL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.float().abs().max().clamp(min=1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= REL[dtype], f"relative error {err:.2e} > {REL[dtype]:.0e}"
