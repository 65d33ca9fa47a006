"""Mixed-adapter LoRA through the CPU kernels, per adapter segment, from the device tier's packed tensors.

Same semantics as lora_ops.LoraBatch (y[t, slice_p] += B_{s[t],p} · (A_{s[t],p} · x[t])), computed the way
Punica's SGMV does on GPUs (csrc/lora.cpp): for each adapter of the batch, its own tokens against its own
weights — each adapter's bytes read once per step, no masked [T, ΣR] product, and nothing restacked when
the set of adapters in the batch changes: a batch only references what `prepare_packed` put in the
device tier. A DoRA adapter's rows are rescaled in the same call, after its deltas (csrc/lora.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from trtllm_peft.executor.torch import huge_pages
from trtllm_peft.executor.torch.lora_ops import (
    GROUPS,
    AdapterTensors,
    part_slices,
    prepare,
    project_then_apply,
)
from trtllm_peft.lora.adapter import LoraAdapter
from trtllm_peft.lora.spec import ModelSpec


@dataclass
class PackedGroup:
    """One adapter's (layer, group) in the kernels' packed layout (csrc/linear.cpp)."""

    a: torch.Tensor  # packed A [P·R, in]
    b: list[torch.Tensor]  # P × packed B_p [out_p, R], scale folded in
    mag: torch.Tensor | None = None  # float32 [out] DoRA factor over the group's output (GroupWeights.mag)


def prepare_packed(
    kernels, adapter: LoraAdapter, spec: ModelSpec, dtype: torch.dtype, device
) -> AdapterTensors:
    """`lora_ops.prepare`'s layout, packed once for the kernels (this is what the device tier holds), each
    adapter on pooled 2 MiB pages (`on_huge_pages`)."""
    dense = prepare(adapter, spec, dtype, device)
    groups = {
        key: PackedGroup(
            a=kernels.pack(g.a.reshape(-1, g.a.shape[2])),  # [P, R, in] -> [P·R, in]
            b=[kernels.pack(bt.t().contiguous()) for bt in g.bt],  # [R, out_p] -> B_p [out_p, R]
            mag=None if g.mag is None else g.mag.float().contiguous(),  # the kernels read float32
        )
        for key, g in dense.groups.items()
    }
    if torch.device(device).type == "cpu":
        groups = on_huge_pages(groups)
    return replace(dense, groups=groups)


def on_huge_pages(groups: dict) -> dict:
    """Copies of the packed groups side by side on 2 MiB pages of the process's pool (huge_pages.Arena), given
    back to it with the adapter. A decode step of distinct adapters reads each one's many small arrays (a
    layer's B_p: 6-96 KB) at memory latency; on 4 KiB pages every page also costs a TLB miss and restarts the
    hardware prefetcher (bench/lora_kernels.py, 8 distinct adapters: see the commit)."""
    arena = huge_pages.Arena(pool=huge_pages.POOL)  # pages earlier adapters used: resident already
    return {
        key: PackedGroup(
            a=arena.place(g.a),
            b=[arena.place(b) for b in g.b],
            mag=None if g.mag is None else arena.place(g.mag),
        )
        for key, g in groups.items()
    }


class GroupedLoraBatch:
    """The adapters of one batch (`prepare_packed` output), referenced in place; same interface as LoraBatch."""

    def __init__(self, kernels, adapters: list[AdapterTensors], spec: ModelSpec) -> None:
        self.k, self.single, self.n = kernels, len(adapters) == 1, len(adapters)
        self.layers, self._plan = spec.num_layers, None
        ranks = [a.width for a in adapters]
        self.groups = {}
        self.scaled: set[tuple[int, str]] = set()  # (layer, group)s a DoRA adapter of the batch rescales
        for layer in range(spec.num_layers):
            for g, parts in part_slices(spec).items():
                found = [a.groups.get((layer, g)) for a in adapters]
                if parts and any(f is not None for f in found):
                    mags = [f.mag if f is not None else None for f in found]
                    self.groups[(layer, g)] = kernels.LoraGroup(
                        a=[f.a if f is not None else None for f in found],
                        b=[f.b if f is not None else [] for f in found],
                        ranks=ranks,
                        starts=[sl.start for _, sl in parts],
                        widths=[sl.stop - sl.start for _, sl in parts],
                        mag=mags,
                    )
                    if any(m is not None for m in mags):
                        self.scaled.add((layer, g))

    def mask(self, token_adapter: torch.Tensor):
        """Each adapter's tokens (token_adapter [T]: index into the batch, -1: none), grouped once per step for
        every (layer, group) call (kernels.LoraRows); None when all use the only adapter."""
        if self.single and bool((token_adapter == 0).all()):
            return None
        return self.k.LoraRows(token_adapter.to(torch.long), self.n)

    def decode_plan(self):
        """Every layer's groups as a one-call decode step reads them (kernels.DecodeLora), made once."""
        if self._plan is None:
            order = [self.groups.get((layer, g)) for layer in range(self.layers) for g in GROUPS]
            self._plan = self.k.DecodeLora(order)
        return self._plan

    def scales(self, layer: int, group: str) -> bool:
        """Whether a DoRA adapter of this batch rescales this (layer, group)'s output."""
        return (layer, group) in self.scaled

    def project(self, layer: int, group: str, linear, x: torch.Tensor, mask, out: torch.Tensor | None = None):
        """x · Wᵀ (+ b) + the LoRA delta [T, out] of the projection `linear` (a KernelLinear); `out` given: added
        into it (the residual) and returned, in one kernel call (csrc/lora.cpp project): with one adapter in the
        group, the base weights and its A shared out over the threads in one parallel region, its B in a second,
        instead of the base on every thread and the LoRA products after it on one."""
        st = self.groups.get((layer, group))
        packed = getattr(linear, "packed", None)
        if st is None or packed is None or (layer, group) in self.scaled or x.stride(-1) != 1:
            return project_then_apply(self, layer, group, linear, x, mask, out)
        y = x.new_empty(x.shape[0], linear.out_features) if out is None else out
        st.project(x, packed, linear.out_features, linear.bias, y, out is not None, mask)
        return y

    def apply_group(
        self,
        layer: int,
        group: str,
        x: torch.Tensor,
        y: torch.Tensor,
        mask,
        bias: torch.Tensor | None = None,
    ) -> None:
        """y[T, out] += the LoRA delta of each token's adapter for this (layer, group); x [T, in]. When
        `scales()`, y must hold the projection W x + bias alone (`bias`: the projection's, left unscaled)."""
        st = self.groups.get((layer, group))
        if st is not None:
            st.apply(x, y, mask, bias if (layer, group) in self.scaled else None)
