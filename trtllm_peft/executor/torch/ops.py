"""The per-layer ops of the forward pass, in two interchangeable implementations.

`TorchOps` is plain torch: it runs on every device (CUDA included) and is the oracle. `KernelOps` runs the
same math through the AVX-512 kernels of csrc/, where a decode step's cost is weight streaming
and per-op overhead. `ops_for(device, dtype, use_kernels)` picks one at executor start.

Semantics shared by both (tests/unit/test_cpu_kernels.py, test_layer_blocks.py and test_lora_ops.py hold them
to each other):
    linear(W, b)(x)            x · Wᵀ + b                     x [T, in] -> [T, out]; `.add_to(y, x)`: y += x·Wᵀ + b
    rms_norm(x, w, eps)        w · cast(x / rms(x))           computed in float32 then cast, as transformers
    silu_mul(gu)               silu(gate) · up                gu [T, 2I] = [gate | up] -> [T, I]
    norm_linear(x, w, eps, l)  l(rms_norm(x, w, eps))         one call where the kernels run (as the next two)
    mlp_into(x, w, eps, gu, d) x += d(silu_mul(gu(rms_norm(x, w, eps))))          a layer's MLP half
    decode_attention_into(x, w, eps, qkv, o, ...)  x += o(attend_decode(norm_linear(x, w, eps, qkv), ...))
    attend_decode(...)         RoPE on q and k, k and v stored at each row's position through its block
                               table, then attention of each row's query over its positions 0..pos -> [B, q_dim]
    attend_chunk(...)          the same for n consecutive prompt tokens of one sequence (one block table),
                               causal within the chunk, over the cached positions before it -> [n, q_dim]
    prepare_lora, lora_batch   an adapter's device-tier form; a batch's adapters with
                               `apply_group(layer, group, x, y, mask)`: y += each token's LoRA delta;
                               `project(layer, group, linear, x, mask, out)`: linear(x) + the delta (+= out)
    place_weights(linears)     the linears' weights moved to 2 MiB pages (huge_pages.py) where they are tensors
    reserve_adapters(nbytes)   memory for the device tier's adapter copies made resident now (at start)
    argmax(logits)             torch.argmax(logits, -1) of float32 [B, V] logits (greedy sampling)
    use_threads(n)             the engine thread's threading
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from trtllm_peft.executor.torch import cpu_kernels, huge_pages
from trtllm_peft.executor.torch.kv import PagedKVCache
from trtllm_peft.executor.torch.linear import KernelLinear, Linear, single_thread_except_big_matmuls
from trtllm_peft.executor.torch.lora_grouped import GroupedLoraBatch, prepare_packed
from trtllm_peft.executor.torch.lora_ops import AdapterTensors, LoraBatch, prepare
from trtllm_peft.executor.torch.sampler import greedy_argmax
from trtllm_peft.lora.adapter import LoraAdapter
from trtllm_peft.lora.spec import ModelSpec


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] rotated by per-token cos/sin [T, 1, hd] (rotate-half convention, as HF Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class TorchOps:
    """Plain torch ops: every device; the reference the kernels are tested against."""

    name = "torch"

    def use_threads(self, n: int) -> None:
        """Set the calling (engine) thread's threading: small ops on one, weight-streaming matmuls on `n`."""
        single_thread_except_big_matmuls(n)

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True) -> Linear:
        return Linear(weight, bias, pack=pack)

    def prepare_lora(
        self, adapter: LoraAdapter, spec: ModelSpec, dtype: torch.dtype, device
    ) -> AdapterTensors:
        """An adapter in the form this implementation's LoRA batches use (what the device tier holds)."""
        return prepare(adapter, spec, dtype, device)

    def lora_batch(
        self, adapters: list[AdapterTensors], spec: ModelSpec, dtype, device, *, one_off: bool = False
    ):
        """The adapters of a batch, ready for `apply_group`; one_off: used for a single forward (a prefill)."""
        return LoraBatch(adapters, spec, dtype, device, pack=not one_off, linear=self.linear)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
        return weight * h.to(x.dtype)

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up

    def norm_linear(self, x: torch.Tensor, weight: torch.Tensor, eps: float, linear) -> torch.Tensor:
        return linear(self.rms_norm(x, weight, eps))

    def mlp_into(self, x: torch.Tensor, weight: torch.Tensor, eps: float, gate_up, down) -> None:
        down.add_to(x, self.silu_mul(self.norm_linear(x, weight, eps, gate_up)))

    def decode_attention_into(self, x, weight, eps, qkv, o, cos, sin, positions, cache, layer, shape, tables):
        o.add_to(x, self.attend_decode(self.norm_linear(x, weight, eps, qkv), cos, sin, positions, cache, layer,
                                       shape, tables))  # fmt: skip

    def place_weights(self, linears: list) -> None:
        """oneDNN's packed weights are opaque tensors: left where they are."""

    def reserve_adapters(self, nbytes: int) -> None:
        """The device tier's adapters are plain torch tensors here: nothing to reserve."""

    def decoder(self, model):
        """The model's decode-only step as one call `(ids, positions, tables, cache, lora plan, rows) -> logits`
        (GroupedLoraBatch.decode_plan and .mask, or None: the base model), or None: the model runs its layers
        one by one."""
        return None

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return greedy_argmax(logits)

    def attend_decode(
        self,
        qkv: torch.Tensor,  # [B, q + 2kv]
        cos: torch.Tensor,  # [L, hd] tables
        sin: torch.Tensor,
        positions: torch.Tensor,  # [B] int64
        cache: PagedKVCache,
        layer: int,
        shape: tuple[int, int, int],  # (num_heads, num_kv_heads, head_dim)
        tables: torch.Tensor,  # [B, W] int32 block tables
    ) -> torch.Tensor:
        heads, kv_heads, hd = shape
        b, q_dim, groups = qkv.shape[0], heads * hd, heads // kv_heads
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        qk = rope(qkv[:, : q_dim + kv_heads * hd].view(b, heads + kv_heads, hd), c, s)
        v = qkv[:, q_dim + kv_heads * hd :].view(b, kv_heads, hd)
        length = int(positions.max()) + 1
        cache.write_step(layer, tables, positions, qk[:, heads:], v)
        keys, values = cache.gather_rows(layer, tables, length)  # [B, kv, L, hd]
        valid = torch.arange(length, device=qkv.device)[None, :] <= positions[:, None]  # [B, L]
        # GQA without repeating K/V: the query heads of one kv head become that head's query "length".
        qg = qk[:, :heads].reshape(b, kv_heads, groups, hd)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=valid[:, None, None, :])
        return out.reshape(b, q_dim)

    def attend_chunk(
        self,
        qkv: torch.Tensor,  # [n, q + 2kv]: tokens at positions start..start+n-1 of one sequence
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,  # [n] int64, consecutive
        cache: PagedKVCache,
        layer: int,
        shape: tuple[int, int, int],
        table: torch.Tensor,  # [W] int32: the sequence's block table
    ) -> torch.Tensor:
        heads, kv_heads, hd = shape
        n, q_dim = qkv.shape[0], heads * hd
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        qk = rope(qkv[:, : q_dim + kv_heads * hd].view(n, heads + kv_heads, hd), c, s)
        v = qkv[:, q_dim + kv_heads * hd :].view(n, kv_heads, hd)
        start, end = int(positions[0]), int(positions[-1]) + 1
        cache.write(layer, table, start, qk[:, heads:], v)
        keys, values = cache.gather(layer, table, end)  # [kv, end, hd]
        pos = torch.arange(end, device=qkv.device)
        allowed = pos[None, :] <= pos[start:, None]  # [n, end]
        out = F.scaled_dot_product_attention(
            qk[:, :heads].transpose(0, 1)[None],
            keys[None],
            values[None],
            attn_mask=allowed[None, None],
            enable_gqa=True,
        )  # [1, heads, n, hd]
        return out[0].transpose(0, 1).reshape(n, q_dim)


class KernelOps(TorchOps):
    """The same ops through the CPU kernels of csrc/ (float32 or bfloat16)."""

    name = "cpu-kernels"

    def __init__(self, kernels: ModuleType) -> None:
        self.k = kernels
        self.arena = huge_pages.Arena()  # the model's packed weights (place_weights)

    def use_threads(self, n: int) -> None:
        # The kernels size their own parallelism (small ops stay on the calling thread), from their own count.
        self.k.set_num_threads(n)
        torch.set_num_threads(n)

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True):
        return KernelLinear(self.k, weight, bias)  # the kernels read only the packed layout

    def prepare_lora(self, adapter, spec, dtype, device) -> AdapterTensors:
        return prepare_packed(self.k, adapter, spec, dtype, device)

    def lora_batch(self, adapters, spec, dtype, device, *, one_off: bool = False) -> GroupedLoraBatch:
        return GroupedLoraBatch(self.k, adapters, spec)  # references the packed tensors: no copy to avoid

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.k.rms_norm(x, weight, eps)

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        return self.k.silu_mul(gu)

    # A layer's parts in one call each (csrc/layer_ops.cpp): the Python between the ops is the saving.
    def norm_linear(self, x, weight, eps, linear) -> torch.Tensor:
        return self.k.norm_linear(x, weight, eps, linear.packed, linear.out_features, linear.bias)

    def mlp_into(self, x, weight, eps, gate_up, down) -> None:
        k = self.k
        k.mlp_into(x, weight, eps, gate_up.packed, gate_up.out_features, gate_up.bias, down.packed,
                   down.out_features, down.bias)  # fmt: skip

    def decode_attention_into(self, x, weight, eps, qkv, o, cos, sin, positions, cache, layer, shape, tables):
        self.k.decode_attention_into(x, weight, eps, qkv.packed, qkv.out_features, qkv.bias, cos, sin, positions,
                                     cache.k[layer], cache.v[layer], tables, *shape, o.packed, o.out_features,
                                     o.bias)  # fmt: skip

    def place_weights(self, linears: list[KernelLinear]) -> None:
        """The packed weights onto 2 MiB pages, side by side: a decode step streams them all (huge_pages.py)."""
        for lin in linears:
            lin.packed = self.arena.place(lin.packed)

    def reserve_adapters(self, nbytes: int) -> None:
        """The pages `prepare_lora` places adapters on (huge_pages.POOL), resident before the first request."""
        huge_pages.POOL.reserve(nbytes)

    def decoder(self, model):
        """csrc/decode_step.cpp: the weights handed over once, a step is one call (was two a layer)."""
        weights, biases = [], []
        for ly in model.layers:
            assert ly.o.bias is ly.gate_up.bias is ly.down.bias is None  # as LlamaModel builds them
            weights += [ly.ln1, ly.qkv.packed, ly.o.packed, ly.ln2, ly.gate_up.packed, ly.down.packed]
            biases.append(ly.qkv.bias)
        ly, head = model.layers[0], model.lm_head
        widths = [lin.out_features for lin in (ly.qkv, ly.o, ly.gate_up, ly.down, head)]
        decode = self.k.DecodeModel(model.embed, weights, biases, widths, model.norm, head.packed,
                                    model.arch.rms_norm_eps, list(model._shape))  # fmt: skip
        cos, sin = model.cos, model.sin

        def step(ids, positions, tables, cache: PagedKVCache, lora=None, rows=None) -> torch.Tensor:
            return decode.step(ids, cos, sin, positions, cache.k, cache.v, tables, lora, rows)

        return step

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        # torch's CPU argmax/max are slow reductions (~1-5 ms at [8-32, 49152] on the engine thread)
        if logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] and logits.stride(1) == 1:
            return self.k.argmax_rows(logits)
        return torch.argmax(logits, dim=-1)

    def attend_decode(self, qkv, cos, sin, positions, cache, layer, shape, tables) -> torch.Tensor:
        return self.k.attend_decode(qkv, cos, sin, positions, cache.k[layer], cache.v[layer], tables, *shape)

    def attend_chunk(self, qkv, cos, sin, positions, cache, layer, shape, table) -> torch.Tensor:
        # blocked chunk attention (csrc/attend_chunk.cpp): each K/V block read once for all the chunk's rows
        start = int(positions[0])
        return self.k.attend_chunk(qkv, cos, sin, start, cache.k[layer], cache.v[layer], table, *shape)


def ops_for(device: torch.device, dtype: torch.dtype, use_kernels: bool = True) -> TorchOps:
    """KernelOps on a CPU that can run them (float32/bfloat16), else TorchOps."""
    if use_kernels and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        kernels = cpu_kernels.load()
        if kernels is not None:
            return KernelOps(kernels)
    return TorchOps()
