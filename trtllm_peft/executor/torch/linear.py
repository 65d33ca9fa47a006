"""Frozen projections y = x·Wᵀ + b: `Linear` on torch (prepacked for oneDNN when that pays), `KernelLinear`
on the CPU kernels (what ops.KernelOps uses)."""

from __future__ import annotations

import threading

import torch

# Below this size a packed call's fixed cost (~15 µs) exceeds what packing saves (measured: 48×576 and
# 576×16 run faster plain; 384×576 and larger run 1.4-1.9× faster packed).
PACK_MIN_ELEMENTS = 64 * 1024


class _Threads(threading.local):
    """How many threads the big (packed) matmuls get while every other op runs on one.

    Measured on 2 shared cores: small ops (norms, RoPE, LoRA's skinny matmuls) issued from a background
    thread pay tens of µs per OpenMP team wake-up, more than they compute; the weight-streaming matmuls
    still gain from two threads. `set_big(n)` turns the policy on for the calling thread.
    """

    big = 0  # 0: policy off, torch's own setting everywhere (per OS thread: only the engine thread opts in)


THREADS = _Threads()


def single_thread_except_big_matmuls(big: int) -> None:
    """Use one intra-op thread in the calling thread, and `big` threads inside packed matmuls."""
    THREADS.big = big if big > 1 else 0
    torch.set_num_threads(1 if big > 1 else max(big, 1))


def _packed(x, packed, bias):
    if THREADS.big:
        torch.set_num_threads(THREADS.big)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        torch.set_num_threads(1)
        return out
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear:
    """y = x Wᵀ + b. On CPU the weight is prepacked once for oneDNN (the layout torch.compile's freezing
    uses): skinny decode matmuls then stream weights at memory bandwidth instead of repacking them on every
    call — measured 2–3× faster per step on this machine. Elsewhere (CUDA) it is plain F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True) -> None:
        self.out_features, self.in_features = weight.shape  # weight [out, in]
        self.bias = bias
        self.packed = None
        if (
            pack
            and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.numel() >= PACK_MIN_ELEMENTS
            and torch.backends.mkldnn.is_available()
        ):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
            self.weight = None  # the packed copy replaces it
        else:
            self.weight = weight
            self.weight_t = weight.t()  # [in, out] view: no copy

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return _packed(x, self.packed, self.bias)
        if self.bias is not None:
            return torch.addmm(self.bias, x, self.weight_t)
        return x @ self.weight_t

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y += x Wᵀ in place (y may be a column slice): one addmm when unpacked."""
        if self.packed is not None:
            y.add_(_packed(x, self.packed, self.bias))
        elif self.bias is None:
            y.addmm_(x, self.weight_t)
        else:
            y.add_(torch.addmm(self.bias, x, self.weight_t))


class KernelLinear:
    """y = x Wᵀ + b through the CPU kernels (csrc/linear.cpp): W packed once into 16-column k-major blocks and
    read once per call whatever the number of rows (1.3-1.8x oneDNN's packed GEMM at decode sizes); bfloat16
    products of 16 rows or more run on AMX tiles from the same packed W where the CPU has them (csrc/amx.cpp).
    float32 stays on the streaming kernel: oneDNN's float32 GEMM measured no faster at these shapes
    (bench/amx.py), and it would need a second copy of every weight."""

    def __init__(self, kernels, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.k = kernels
        self.out_features, self.in_features = weight.shape  # weight [out, in]
        self.packed = kernels.pack(weight.contiguous())
        self.bias = None if bias is None else bias.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.k.linear(_rows(x), self.packed, self.out_features, self.bias)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """y += x Wᵀ (+ b) in place; y may be a column slice of a wider tensor."""
        self.k.linear_into(_rows(x), self.packed, self.out_features, self.bias, y, True)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along its last axis (a column slice already has it: no copy then)."""
    return x if x.stride(-1) == 1 else x.contiguous()
