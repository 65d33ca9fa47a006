"""Mixed-adapter LoRA through the CPU kernels, per adapter segment, from the device tier's packed tensors.

Same semantics as lora_ops.LoraBatch (y[t, slice_p] += B_{s[t],p} · (A_{s[t],p} · x[t])), computed the way
Punica's SGMV does on GPUs (csrc/lora.cpp): for each adapter of the batch, its own tokens against its own
weights — each adapter's bytes read once per step, no masked [T, ΣR] product, and nothing restacked when
the set of adapters in the batch changes: a batch only references what `prepare_packed` put in the
device tier. A DoRA adapter's rows are rescaled in the same call, after its deltas (csrc/lora.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trtllm_peft.executor.torch import huge_pages
from trtllm_peft.executor.torch.lora_ops import (
    GROUPS,
    AdapterTensors,
    group_width,
    part_slices,
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
    """`lora_ops.prepare`'s layout packed for the kernels (what the device tier holds), bit for bit, in one
    kernel call (csrc/lora_pack.cpp) that writes it from the adapter's own tensors onto pooled 2 MiB pages
    (huge_pages.Arena, as `on_huge_pages` places copies): for a rank-16 SmolLM2 adapter ~4-5 ms of the engine
    thread, where dense copies, packs and a copy (~2,500 torch ops) took 27-36 ms (bench/adapter_intake.py).
    The kernels read CPU memory only: `device` is the CPU."""
    width, plan = adapter.max_rank, _pack_plan(adapter, spec, dtype)
    pages, at = huge_pages.Arena(pool=huge_pages.POOL).slots(plan.sizes)
    flat = iter(kernels.pack_adapter(pages, at, dtype, width, plan.groups, plan.cols, plan.a, plan.b,
                                     plan.scale, plan.mag))  # fmt: skip
    groups = {}
    for key, parts, dora in plan.keys:
        a, b = next(flat), [next(flat) for _ in range(parts)]
        groups[key] = PackedGroup(a=a, b=b, mag=next(flat) if dora else None)
    return AdapterTensors(width=width, groups=groups, rank_units=sum(w.rank for _, w in adapter))


@dataclass
class _PackPlan:
    """pack_adapter's arguments: per group (parts, in, width); per part its columns, tensors and scale."""

    keys: list = field(default_factory=list)  # per group: ((layer, group), parts, has a DoRA factor)
    sizes: list[int] = field(default_factory=list)  # bytes of each output tensor, in order
    groups: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    a: list = field(default_factory=list)
    b: list = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    mag: list = field(default_factory=list)


_SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what pack_adapter reads as they are


def _pack_plan(adapter: LoraAdapter, spec: ModelSpec, dtype: torch.dtype) -> _PackPlan:
    """The groups `prepare` lays out (a layer's group where the adapter has one of its parts), in its order."""
    plan, width, item, slices = _PackPlan(), adapter.max_rank, dtype.itemsize, part_slices(spec)
    for layer in adapter.layers:
        for g, parts in slices.items():
            found = [adapter.weights.get((layer, m)) for m, _ in parts]
            if all(w is None for w in found):
                continue
            d_in, out = spec.module_dims(parts[0][0])[0], group_width(spec, g)
            dora = any(w is not None and w.is_dora for w in found)
            plan.keys.append(((layer, g), len(parts), dora))
            plan.groups += [len(parts), d_in, out]
            plan.sizes.append(_packed_bytes(len(parts) * width, d_in, item))
            for w, (_, sl) in zip(found, parts, strict=True):
                plan.sizes.append(_packed_bytes(sl.stop - sl.start, width, item))
                plan.cols += [sl.start, sl.stop - sl.start]
                # as prepare reads them: A.to(dtype), B.float() · scale (LoraWeights.scaled_b)
                plan.a.append(None if w is None else _source(w.a, dtype))
                plan.b.append(None if w is None else _source(w.b, torch.float32))
                plan.scale.append(1.0 if w is None else w.scale)
                plan.mag.append(None if w is None or not w.is_dora else _source(w.magnitude, torch.float32))
            if dora:
                plan.sizes.append(out * 4)
    return plan


def _source(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as pack_adapter reads it: float32 / bfloat16 / float16 as they are (it widens them exactly), any
    other dtype converted first as `prepare` would."""
    return t if t.dtype in _SOURCE_DTYPES else t.to(dtype)


def _packed_bytes(n: int, k: int, itemsize: int) -> int:
    """Bytes of W [n, k] packed (csrc/linear.cpp): 16-column blocks, bfloat16 k padded to pairs."""
    return -(-n // 16) * 16 * (k + k % 2 * (itemsize == 2)) * itemsize


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
