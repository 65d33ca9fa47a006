"""Our own Llama-family forward pass (Llama 2/3, Mistral, Qwen2, SmolLM2) over the paged KV cache.

Not transformers' generate: per layer the step is a handful of large ops — RMSNorm, one fused q/k/v
matmul (+ bias for Qwen2), RoPE on q and k together, one attention call, o-proj, one fused gate/up matmul,
SiLU·up, down-proj — plus the LoRA group ops (ops.lora_batch) when the batch has adapters; each through
`ops` (plain torch, or the CPU kernels). One iteration is one forward: the prompt chunks being prefilled and
one token of every decoding sequence, concatenated (TensorRT-LLM's inflight batching with chunked context),
so each weight is read once per iteration. Logits are computed only for the positions that need them
(DESIGN §6: a full-prefill LM head copies the embedding).
Numerics follow transformers' LlamaForCausalLM (RMSNorm in float32, RoPE tables in float32 cast to the
compute dtype, attention scale 1/√head_dim), so greedy tokens and log-probs match PEFT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trtllm_peft.engine.engine_dir import ArchConfig
from trtllm_peft.executor.torch.kv import PagedKVCache
from trtllm_peft.executor.torch.linear import Linear
from trtllm_peft.executor.torch.lora_grouped import GroupedLoraBatch
from trtllm_peft.executor.torch.lora_ops import LoraBatch
from trtllm_peft.executor.torch.ops import TorchOps, rope


@dataclass
class FreshChunks:
    """The iteration's chunks that start their sequence (nothing cached before them), attended together
    without reading the cache: planned once per iteration, used by every layer."""

    tokens: torch.Tensor  # [F] long: their tokens' indices in the iteration, grouped by chunk length
    rows: torch.Tensor  # [F·kv] long: the cache rows their K and V go to (PagedKVCache.rows)
    groups: list[tuple[int, int]]  # (chunk length, number of chunks) per group, in `tokens` order
    whole: bool = False  # `tokens` are all the iteration's chunk tokens in order (0..F-1): no gather needed


@dataclass
class Layer:
    ln1: torch.Tensor  # [H]
    qkv: Linear  # [q + 2kv, H] (+ bias [q + 2kv] for Qwen2)
    o: Linear  # [H, q]
    ln2: torch.Tensor  # [H]
    gate_up: Linear  # [2I, H] rows [gate_proj; up_proj]
    down: Linear  # [H, I]


@dataclass
class Chunk:
    """Prompt positions start..start+length-1 of one sequence, prefilled this iteration."""

    table: torch.Tensor  # [W] int32: the sequence's block table (covers start + length tokens)
    start: int  # positions before it are already in the cache (reused or earlier chunks)
    length: int
    logits: bool = True  # whether its last token's logits are wanted (the prompt's last token is in it)


def rope_inv_freq(arch: ArchConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with llama3 scaling when configured (as transformers computes)."""
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = arch.rope_scaling
    if not sc:
        return inv
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


class LlamaModel:
    """Weights fused at load; `prefill` one sequence into a cache row, `decode` one token for rows 0..B-1.

    `ops` computes the per-layer ops (ops.py): plain torch, or the CPU kernels where they run.
    """

    def __init__(
        self,
        arch: ArchConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device,
        max_seq_len: int,
        ops: TorchOps | None = None,
    ) -> None:
        self.arch, self.dtype, self.device = arch, dtype, torch.device(device)
        self.ops = ops or TorchOps()
        w = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        # What is kept as loaded gets memory of its own: safetensors' tensors are views of the mapped file,
        # and one surviving view keeps the whole file's pages resident (+ its size in RSS, ~0.5 GB here).
        own = {k: v.clone() for k, v in w.items() if "norm" in k or "embed_tokens" in k or k.endswith("bias")}
        w.update(own)
        self.embed = w["model.embed_tokens.weight"]  # [V, H]
        self.lm_head = self.ops.linear(
            self.embed if arch.tie_word_embeddings else w["lm_head.weight"]
        )  # [V, H]
        self.ops.place_weights([self.lm_head])
        self.norm = w["model.norm.weight"]
        self.layers = [self._layer(w, i) for i in range(arch.num_layers)]
        # Base-model layers as a few calls each (ops.norm_linear / mlp_into / decode_attention_into) instead of
        # op by op: the same kernels, less Python between them. False: op by op (bench A/B, decode_profile).
        self.fuse = True
        self.q_dim, self.kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        self._shape = (arch.num_heads, arch.num_kv_heads, arch.head_dim)
        pos = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(pos, rope_inv_freq(arch))  # [L, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=self.device, dtype=dtype)  # [L, hd]
        self.sin = emb.sin().to(device=self.device, dtype=dtype)
        # a fresh chunk's RoPE + KV put in one call (csrc/attend_chunk.cpp), or None: torch ops (and for A/B)
        self.fresh_kernel = getattr(getattr(self.ops, "k", None), "fresh_qkv", None)
        # Fresh chunks through torch's SDPA, or like every other chunk through ops.attend_chunk. On the CPU
        # kernels float32 takes the kernel: torch's float32 SDPA ran the 512-token prefill 1.14x slower
        # (bench/prefill_profile.py --ab). bfloat16 keeps SDPA only where oneDNN has AMX (its tile products:
        # 1.11x faster); without AMX torch's bf16 SDPA is the slower one (AVX-512-BF16, 2 threads: 0.84x the
        # prefill's time through the kernel).
        self.fresh_sdpa = self.fresh_kernel is None or (
            dtype == torch.bfloat16 and self.ops.k.amx_available()
        )
        # A decode-only step as one call where the kernels run (csrc/decode_step.cpp), else None: the layer loop
        # of `_decode_base` (`_forward` with adapters). Built last: it holds the placed weights.
        self.decoder = self.ops.decoder(self)
        # decode-only steps with adapters through `decoder` too (False: `_forward`, the bench's A/B)
        self.fuse_lora = True

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> Layer:
        p = f"model.layers.{i}."
        bias = None
        if self.arch.qkv_bias:
            bias = torch.cat([w[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        linear = self.ops.linear
        layer = Layer(
            ln1=w[p + "input_layernorm.weight"],
            qkv=linear(torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]), bias),
            o=linear(w[p + "self_attn.o_proj.weight"]),
            ln2=w[p + "post_attention_layernorm.weight"],
            gate_up=linear(torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])),
            down=linear(w[p + "mlp.down_proj.weight"]),
        )
        self.ops.place_weights(
            [layer.qkv, layer.o, layer.gate_up, layer.down]
        )  # 2 MiB pages, one layer at a time
        return layer

    def _split_rope(self, qkv: torch.Tensor, positions: torch.Tensor):
        """q [T, heads, hd], k [T, kv, hd] rotated at `positions` [T], and v [T, kv, hd] of a fused qkv."""
        a, t = self.arch, qkv.shape[0]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        qk = rope(
            qkv[:, : self.q_dim + self.kv_dim].view(t, a.num_heads + a.num_kv_heads, a.head_dim), cos, sin
        )
        v = qkv[:, self.q_dim + self.kv_dim :].view(t, a.num_kv_heads, a.head_dim)
        return qk[:, : a.num_heads], qk[:, a.num_heads :], v

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm computed in float32 then cast, as transformers' LlamaRMSNorm."""
        return self.ops.rms_norm(x, weight, self.arch.rms_norm_eps)

    def _forward(
        self, ids: torch.Tensor, attend, lora: LoraBatch | GroupedLoraBatch | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Hidden states [T, H] before the final norm; `attend(layer, qkv) -> [T, q_dim]`."""
        x = self.embed[ids]  # [T, H]: a new tensor, so the residual adds below may write into it
        fused, eps = lora is None and self.fuse, self.arch.rms_norm_eps
        for i, ly in enumerate(self.layers):
            if fused:
                qkv = self.ops.norm_linear(x, ly.ln1, eps, ly.qkv)  # [T, q + 2kv]
            else:
                h = self._norm(x, ly.ln1)
                qkv = ly.qkv(h) if lora is None else lora.project(i, "qkv", ly.qkv, h, mask)
            attn = attend(i, qkv)  # [T, q]
            self._residual(ly.o, i, "o", attn, x, lora, mask)  # x += attn · Woᵀ (+ LoRA)
            if fused:
                self.ops.mlp_into(x, ly.ln2, eps, ly.gate_up, ly.down)
                continue
            h = self._norm(x, ly.ln2)
            gu = ly.gate_up(h) if lora is None else lora.project(i, "gate_up", ly.gate_up, h, mask)  # [T, 2I]
            act = self.ops.silu_mul(gu)  # [T, I]
            self._residual(ly.down, i, "down", act, x, lora, mask)
        return x

    def _decode_base(self, ids, positions, tables, cache: PagedKVCache) -> torch.Tensor:
        """float32 logits [B, V] of a decode-only step without adapters: one call (`decoder`), or two a layer."""
        if self.decoder is not None:
            return self.decoder(ids, positions, tables, cache)
        x, eps, ops = self.embed[ids], self.arch.rms_norm_eps, self.ops  # x [B, H]
        for i, ly in enumerate(self.layers):
            ops.decode_attention_into(x, ly.ln1, eps, ly.qkv, ly.o, self.cos, self.sin, positions, cache, i,
                                      self._shape, tables)  # fmt: skip
            ops.mlp_into(x, ly.ln2, eps, ly.gate_up, ly.down)
        return self.logits(x)

    @staticmethod
    def _residual(linear, layer: int, group: str, inp: torch.Tensor, x: torch.Tensor, lora, mask) -> None:
        """x += inp · Wᵀ + the LoRA delta, the residual add fused into the projection (a DoRA adapter's factor
        applies to W·inp + LoRA before the residual add, PEFT's order: lora.project sees to it)."""
        if lora is None:
            linear.add_to(x, inp)
        else:
            lora.project(layer, group, linear, inp, mask, out=x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, V] of the given (already selected) positions."""
        if self.fuse:
            return self.ops.norm_linear(hidden, self.norm, self.arch.rms_norm_eps, self.lm_head).float()
        return self.lm_head(self._norm(hidden, self.norm)).float()

    @torch.inference_mode()
    def step(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        chunks: list[Chunk],
        tables: torch.Tensor | None,
        cache: PagedKVCache,
        lora: LoraBatch | GroupedLoraBatch | None = None,
        token_adapter: torch.Tensor | None = None,
        context: dict[int, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """One iteration: `ids` [T] at `positions` [T] are the chunks' tokens (in order) then one token per
        decoding row, whose block tables are `tables` [B, W] int32. `token_adapter` [T]: each token's index
        into `lora` (-1: base). Returns float32 logits [R, V]: the last token of each chunk with `logits`,
        then every decoding row. For each chunk index i in `context`, `context[i]` is set to that chunk's
        logits at every position [length, V] (OutputConfig.return_context_logits); no other chunk pays for it.
        """
        tc = sum(c.length for c in chunks)
        mask = lora.mask(token_adapter) if lora is not None else None
        a = self.arch
        shape = (a.num_heads, a.num_kv_heads, a.head_dim)

        fresh = plan_fresh(chunks, cache) if self.fresh_sdpa else None

        def attend(layer, qkv):
            if not tc:  # decode only (the common step): the kernel's output is the layer's
                return self.ops.attend_decode(qkv, self.cos, self.sin, positions, cache, layer, shape, tables)
            chunked = self._attend_chunks(layer, qkv[:tc], positions[:tc], chunks, cache, fresh)
            if qkv.shape[0] == tc:
                return chunked
            decoded = self.ops.attend_decode(
                qkv[tc:], self.cos, self.sin, positions[tc:], cache, layer, shape, tables
            )
            return torch.cat([chunked, decoded])

        if not tc and lora is None and self.fuse:
            return self._decode_base(ids, positions, tables, cache)
        # the adapters' groups in C++ (a torch LoraBatch, e.g. bench/load_check's reference, has no plan)
        planned = isinstance(lora, GroupedLoraBatch) and self.decoder is not None
        if not tc and self.fuse and self.fuse_lora and planned:
            return self.decoder(ids, positions, tables, cache, lora.decode_plan(), mask)
        hidden = self._forward(ids, attend, lora, mask)
        ends = torch.tensor([c.length for c in chunks], dtype=torch.long).cumsum(0).tolist()
        for i in context or {}:
            context[i] = self.logits(hidden[ends[i] - chunks[i].length : ends[i]])  # [length, V]
        rows = [e - 1 for e, c in zip(ends, chunks, strict=True) if c.logits]
        return self.logits(hidden[tc:] if not rows else hidden[rows + list(range(tc, ids.shape[0]))])

    def _attend_chunks(
        self, layer, qkv, positions, chunks: list[Chunk], cache: PagedKVCache, fresh: FreshChunks | None
    ) -> torch.Tensor:
        """Causal attention of each chunk over its sequence's cache positions 0..start+length-1 -> [Tc, q]."""
        a = self.arch
        shape = (a.num_heads, a.num_kv_heads, a.head_dim)
        if fresh is not None and fresh.whole:  # one prompt's prefill: no gather of its rows, no scatter back
            return self._attend_fresh(layer, qkv, positions, fresh, cache)
        out = torch.empty(qkv.shape[0], self.q_dim, dtype=qkv.dtype, device=qkv.device)
        if fresh is not None:
            picked = self._attend_fresh(layer, qkv[fresh.tokens], positions[fresh.tokens], fresh, cache)
            out.index_copy_(0, fresh.tokens, picked)
        if fresh is None and len(chunks) == 1:  # one chunk through the kernel: its output is the layer's
            return self.ops.attend_chunk(
                qkv, self.cos, self.sin, positions, cache, layer, shape, chunks[0].table
            )
        off = 0
        for c in chunks:
            span = slice(off, off + c.length)
            off += c.length
            if c.start or fresh is None:  # over the cache (and itself): query i sees positions <= start+i
                out[span] = self.ops.attend_chunk(
                    qkv[span], self.cos, self.sin, positions[span], cache, layer, shape, c.table
                )
        return out

    def _attend_fresh(self, layer, qkv, positions, fresh: FreshChunks, cache: PagedKVCache) -> torch.Tensor:
        """The fresh chunks' tokens `qkv` [F, q + 2kv]: K and V stored with one copy, then one causal SDPA per
        group of equal lengths (the whole prefix is the chunk: no need to read the cache) -> [F, q]."""
        a = self.arch
        if self.fresh_kernel is not None:
            qk = self.fresh_kernel(
                qkv, self.cos, self.sin, positions, cache.k[layer], cache.v[layer], fresh.rows, *self._shape
            )  # [F, heads + kv, hd], k and v stored
            q, k = qk[:, : a.num_heads], qk[:, a.num_heads :]
            v = qkv[:, self.q_dim + self.kv_dim :].view(-1, a.num_kv_heads, a.head_dim)
        else:
            q, k, v = self._split_rope(qkv, positions)  # [F, heads, hd], [F, kv, hd] x2
            cache.put(layer, fresh.rows, k, v)
        outs, off = [], 0
        for n, g in fresh.groups:
            span = slice(off, off + n * g)
            off += n * g
            o = F.scaled_dot_product_attention(
                q[span].view(g, n, a.num_heads, a.head_dim).transpose(1, 2),
                k[span].view(g, n, a.num_kv_heads, a.head_dim).transpose(1, 2),
                v[span].view(g, n, a.num_kv_heads, a.head_dim).transpose(1, 2),
                is_causal=True,
                enable_gqa=True,
            )  # [g, heads, n, hd]
            outs.append(o.transpose(1, 2).reshape(g * n, self.q_dim))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def plan_fresh(chunks: list[Chunk], cache: PagedKVCache) -> FreshChunks | None:
    """Group the chunks with nothing cached before them by length (one batched attention each)."""
    by_length: dict[int, list[tuple[int, Chunk]]] = {}
    off = 0
    for c in chunks:
        if not c.start:
            by_length.setdefault(c.length, []).append((off, c))
        off += c.length
    if not by_length:
        return None
    tokens, rows = [], []
    for n, group in by_length.items():
        for o, c in group:
            tokens.append(torch.arange(o, o + n, device=cache.device))
            rows.append(cache.rows(c.table, 0, n))
    groups = [(n, len(group)) for n, group in by_length.items()]
    whole = len(groups) == 1 and groups[0][1] == len(chunks)  # every chunk fresh, one length: tokens in order
    return FreshChunks(torch.cat(tokens), torch.cat(rows), groups, whole)
