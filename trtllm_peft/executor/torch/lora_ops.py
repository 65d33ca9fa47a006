"""Mixed-adapter LoRA as a few dense ops per projection group, whatever the number of adapters.

The model computes four projection groups per layer: `qkv` (fused q/k/v), `o`, `gate_up` (fused gate/up)
and `down`. A group has parts — the TensorRT-LLM modules whose outputs are column slices of the group's
output (qkv: attn_q | attn_k | attn_v, or the whole attn_qkv; gate_up: mlp_h_to_4h | mlp_gate = HF gate |
up). For a batch of T tokens where token t uses adapter `s[t]` (or none, -1), the pure semantics are

    y[t, slice_p] += B_{s[t],p} · (A_{s[t],p} · x[t])        for every part p        (B already × scale)

and `apply_group` computes exactly that without a loop over tokens or adapters:

    A_cat  [P·R, in]    the A of every adapter in the batch, stacked along the rank axis per part
                        (adapter j owns columns [off_j, off_j + R_j) of each part's block of R)
    xa     = x · A_catᵀ                  [T, P·R]       one matmul for all adapters and parts
    xa    *= mask[t, c] = owner[c] == s[t]              keep only each token's own adapter's columns
    y[:, slice_p] += xa[:, p-block] · Bt_p   [T, out_p] one matmul per part, Bt_p [R, out_p]

An adapter lacking a module (or a layer), or with a smaller rank in one module, contributes zero rows, so
the result is exact. The stacked tensors are rebuilt only when the set of adapters in the batch changes.

DoRA (PEFT's `y = (m / ‖W + s·B·A‖_row) ⊙ (W x + s·B·A x) + bias`): the factor g = m / ‖…‖ comes normalized
with the adapter (computed once at load, lora/dora.py, as TensorRT-LLM's rows carry it), so per step it is one
multiply of each DoRA token's projection output, after the LoRA delta and before any residual add:

    y[t] = g_{s[t]} ⊙ y[t] + bias ⊙ (1 - g_{s[t]})     (g = 1 for plain-LoRA and base tokens: y unchanged)

`scales(layer, group)` tells the model when a projection needs it (model.py then does not fuse the residual add).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from trtllm_peft.executor.torch.linear import Linear
from trtllm_peft.lora.adapter import LoraAdapter
from trtllm_peft.lora.spec import ModelSpec

GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "qkv": ("attn_qkv", "attn_q", "attn_k", "attn_v"),
    "o": ("attn_dense",),
    "gate_up": ("mlp_gate_up", "mlp_h_to_4h", "mlp_gate"),
    "down": ("mlp_4h_to_h",),
}
GROUPS = tuple(GROUP_MODULES)


def part_slices(spec: ModelSpec) -> dict[str, list[tuple[str, slice]]]:
    """Per group, the engine's enabled modules and the output columns of the fused projection they add to."""
    q, kv, i = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    cols = {
        "attn_qkv": slice(0, q + 2 * kv),
        "attn_q": slice(0, q),
        "attn_k": slice(q, q + kv),
        "attn_v": slice(q + kv, q + 2 * kv),
        "attn_dense": slice(0, spec.hidden_size),
        "mlp_gate_up": slice(0, 2 * i),
        "mlp_h_to_4h": slice(0, i),
        "mlp_gate": slice(i, 2 * i),
        "mlp_4h_to_h": slice(0, spec.hidden_size),
    }
    enabled = set(spec.lora_target_modules)
    return {g: [(m, cols[m]) for m in mods if m in enabled] for g, mods in GROUP_MODULES.items()}


@dataclass
class GroupWeights:
    """One adapter's weights for one (layer, group), zero-padded to the adapter's width R."""

    a: torch.Tensor  # [P, R, in]
    bt: list[torch.Tensor]  # P × [R, out_p]
    mag: torch.Tensor | None = (
        None  # [out] DoRA factor over the group's output (1 on plain parts); None: no DoRA
    )


@dataclass
class AdapterTensors:
    """An adapter in compute form (the device tier of the PEFT cache holds these)."""

    width: int  # R: the adapter's largest rank; every (layer, group) is padded to it
    groups: dict[tuple[int, str], GroupWeights]
    rank_units: int  # Σ over rows of rank: its cost in the PEFT cache budget


def prepare(
    adapter: LoraAdapter, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str
) -> AdapterTensors:
    """Lay out a (fitted, scale-folded) adapter per (layer, group) for `apply_group`."""
    slices, width = part_slices(spec), adapter.max_rank
    groups: dict[tuple[int, str], GroupWeights] = {}
    for layer in adapter.layers:
        for g, parts in slices.items():
            present = [(m, sl) for m, sl in parts if (layer, m) in adapter.weights]
            if not present:
                continue
            d_in = spec.module_dims(parts[0][0])[0]
            a = torch.zeros(len(parts), width, d_in, dtype=dtype, device=device)  # [P, R, in]
            bt = [torch.zeros(width, sl.stop - sl.start, dtype=dtype, device=device) for _, sl in parts]
            for p, (m, _) in enumerate(parts):
                w = adapter.weights.get((layer, m))
                if w is not None:
                    a[p, : w.rank] = w.a.to(device=device, dtype=dtype)
                    bt[p][: w.rank] = w.scaled_b(torch.float32).t().to(device=device, dtype=dtype)
            mag = _group_magnitude(adapter, layer, parts, group_width(spec, g), dtype, device)
            groups[(layer, g)] = GroupWeights(a=a, bt=bt, mag=mag)
    units = sum(w.rank for _, w in adapter)
    return AdapterTensors(width=width, groups=groups, rank_units=units)


def group_width(spec: ModelSpec, group: str) -> int:
    """Output columns of a projection group (the fused qkv and gate_up included)."""
    q, kv, i = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    return {"qkv": q + 2 * kv, "o": spec.hidden_size, "gate_up": 2 * i, "down": spec.hidden_size}[group]


def _group_magnitude(
    adapter: LoraAdapter, layer: int, parts, width: int, dtype, device
) -> torch.Tensor | None:
    """The DoRA factor over a group's output columns `[out]` (1 where a part is plain or absent), or None."""
    found = [(adapter.weights.get((layer, m)), sl) for m, sl in parts]
    if not any(w is not None and w.is_dora for w, _ in found):
        return None
    mag = torch.ones(width, dtype=torch.float32)
    for w, sl in found:
        if w is not None and w.is_dora:
            mag[sl] = w.magnitude.to(torch.float32)  # normalized: m / ‖W + s·B·A‖_row
    return mag.to(device=device, dtype=dtype)


def dora_table(found: list[GroupWeights | None], like: torch.Tensor) -> torch.Tensor | None:
    """[n + 1, out] each adapter's DoRA factor (1s when it has none), then 1s for base tokens; None: no DoRA."""
    mags = [f.mag if f is not None else None for f in found]
    if all(m is None for m in mags):
        return None
    width = next(m for m in mags if m is not None).shape[0]
    ones = like.new_ones(width)
    return torch.stack([m if m is not None else ones for m in mags] + [ones])


def apply_dora(y: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y = g ⊙ y + bias ⊙ (1 - g): PEFT's factor on W x + s·B·A x, the bias left unscaled (rows where g = 1
    come out bit for bit unchanged). g `[T, out]` or `[out]`."""
    y.mul_(g)
    if bias is not None:
        y.add_(bias * (1 - g))


def project_then_apply(
    lora, layer: int, group: str, linear, x: torch.Tensor, mask, out: torch.Tensor | None = None
):
    """`project` as two calls: the base projection, then `lora.apply_group` (a DoRA group's factor applies to
    W x + bias + delta before any residual add: PEFT's order)."""
    if out is None or lora.scales(layer, group):
        y = linear(x)  # [T, out]
        lora.apply_group(layer, group, x, y, mask, linear.bias)
        return y if out is None else out.add_(y)
    linear.add_to(out, x)
    lora.apply_group(layer, group, x, out, mask)
    return out


class TokenMask(NamedTuple):
    """What LoraBatch.mask() hands back to apply_group: column mask and each token's row of the DoRA table."""

    cols: torch.Tensor  # [T, R] in the compute dtype
    index: torch.Tensor  # [T] adapter index, base tokens -> n (the table's row of 1s)


@dataclass
class StackedGroup:
    """A (layer, group) for every adapter of a batch, stacked along the rank axis."""

    a: Linear  # A_cat [P·R, in]
    b: list[Linear]  # P × B_p [out_p, R]
    slices: list[slice]
    dora: torch.Tensor | None = None  # [n + 1, out] DoRA factors (dora_table); None: no DoRA adapter here


class LoraBatch:
    """The adapters of one batch, stacked once; `mask()` per step, `apply_group()` per projection."""

    def __init__(
        self,
        adapters: list[AdapterTensors],
        spec: ModelSpec,
        dtype: torch.dtype,
        device,
        *,
        pack: bool = True,
        linear=Linear,
    ) -> None:
        self.dtype, self.device, self.pack = dtype, device, pack
        self.linear = linear  # (weight, *, pack) -> a product with __call__ and add_to (linear.py)
        self.width = sum(a.width for a in adapters)
        owner = [j for j, a in enumerate(adapters) for _ in range(a.width)]
        self.owner = torch.tensor(owner, dtype=torch.long, device=device)  # [R]
        self.groups: dict[tuple[int, str], StackedGroup] = {}
        slices = part_slices(spec)
        for layer in range(spec.num_layers):
            for g, parts in slices.items():
                found = [a.groups.get((layer, g)) for a in adapters]
                if parts and any(f is not None for f in found):
                    self.groups[(layer, g)] = self._stack(adapters, found, parts)

    def _stack(self, adapters, found, parts) -> StackedGroup:
        ref = next(f for f in found if f is not None)
        a_parts, bt = [], [[] for _ in parts]
        for adapter, f in zip(adapters, found, strict=True):
            if f is None:  # this adapter has nothing here: zero rows keep the column layout uniform
                f = GroupWeights(
                    a=ref.a.new_zeros(len(parts), adapter.width, ref.a.shape[2]),
                    bt=[b.new_zeros(adapter.width, b.shape[1]) for b in ref.bt],
                )
            a_parts.append(f.a)
            for p, b in enumerate(f.bt):
                bt[p].append(b)
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1)  # [P, R, in]; one adapter: no copy
        # A decode batch is restacked only when its set changes and then serves many steps: prepack it like
        # the base weights (2-3x faster matmuls for one reorder ~ one more copy). A prefill's single adapter
        # (pack=False) uses its device-tier tensors as they are: no copy at all.
        return StackedGroup(
            a=self.linear(a.reshape(-1, a.shape[2]), pack=self.pack),
            b=[self.linear((b[0] if len(b) == 1 else torch.cat(b)).t(), pack=self.pack) for b in bt],
            slices=[sl for _, sl in parts],
            dora=dora_table(found, ref.a),
        )

    def mask(self, token_adapter: torch.Tensor) -> TokenMask | None:
        """Per token: its adapter's columns (1 where column c belongs to token t's adapter, an index into the
        list; -1 = base) and its row of the DoRA tables. None when one adapter serves every token."""
        if int(self.owner[-1]) == 0 and bool((token_adapter == 0).all()):
            return None
        n = int(self.owner[-1]) + 1
        index = torch.where(token_adapter < 0, n, token_adapter).to(torch.long)
        return TokenMask((self.owner[None, :] == token_adapter[:, None]).to(self.dtype), index)

    def scales(self, layer: int, group: str) -> bool:
        """Whether a DoRA adapter of this batch rescales this (layer, group)'s output."""
        st = self.groups.get((layer, group))
        return st is not None and st.dora is not None

    def project(self, layer: int, group: str, linear, x: torch.Tensor, mask, out: torch.Tensor | None = None):
        """x · Wᵀ (+ b) + the LoRA delta [T, out] of the projection `linear` (Linear); `out` given: added into
        it (the residual) and returned."""
        return project_then_apply(self, layer, group, linear, x, mask, out)

    def apply_group(
        self,
        layer: int,
        group: str,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: TokenMask | None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """y[T, out] += the LoRA delta of each token's adapter for this (layer, group); x [T, in]. When
        `scales()`, y must hold the projection W x + bias alone (`bias`: the projection's, left unscaled)."""
        st = self.groups.get((layer, group))
        if st is None:
            return
        xa = st.a(x)  # [T, P·R]
        r = self.width
        if mask is not None:
            xa.view(x.shape[0], len(st.b), r).mul_(mask.cols[:, None, :])
        for p, (b, sl) in enumerate(zip(st.b, st.slices, strict=True)):
            b.add_to(y if sl.start == 0 and sl.stop == y.shape[1] else y[:, sl], xa[:, p * r : (p + 1) * r])
        if st.dora is not None:
            apply_dora(y, st.dora[0] if mask is None else st.dora[mask.index], bias)
