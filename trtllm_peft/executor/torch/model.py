"""Our own Llama-family forward pass (Llama 2/3, Mistral, Qwen2, SmolLM2) over a preallocated KV cache.

Not transformers' generate: per layer the step is a handful of large ops — RMSNorm, one fused q/k/v
matmul (+ bias for Qwen2), RoPE on q and k together, one attention call, o-proj, one fused gate/up matmul,
SiLU·up, down-proj — plus the LoRA group ops (ops.lora_batch) when the batch has adapters; each through
`ops` (plain torch, or the CPU kernels). Prompts admitted together are prefilled in one forward. Logits are
computed only for the positions that need them (DESIGN §6: a full-prefill LM head copies the embedding).
Numerics follow transformers' LlamaForCausalLM (RMSNorm in float32, RoPE tables in float32 cast to the
compute dtype, attention scale 1/√head_dim), so greedy tokens and log-probs match PEFT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trtllm_peft.engine.engine_dir import ArchConfig
from trtllm_peft.executor.torch.kv_cache import KVCache
from trtllm_peft.executor.torch.linear import Linear
from trtllm_peft.executor.torch.lora_grouped import GroupedLoraBatch
from trtllm_peft.executor.torch.lora_ops import LoraBatch
from trtllm_peft.executor.torch.ops import TorchOps, rope


@dataclass
class Layer:
    ln1: torch.Tensor  # [H]
    qkv: Linear  # [q + 2kv, H] (+ bias [q + 2kv] for Qwen2)
    o: Linear  # [H, q]
    ln2: torch.Tensor  # [H]
    gate_up: Linear  # [2I, H] rows [gate_proj; up_proj]
    down: Linear  # [H, I]


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
        self.embed = w["model.embed_tokens.weight"]  # [V, H]
        self.lm_head = self.ops.linear(
            self.embed if arch.tie_word_embeddings else w["lm_head.weight"]
        )  # [V, H]
        self.norm = w["model.norm.weight"]
        self.layers = [self._layer(w, i) for i in range(arch.num_layers)]
        self.q_dim, self.kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        pos = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(pos, rope_inv_freq(arch))  # [L, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(device=self.device, dtype=dtype)  # [L, hd]
        self.sin = emb.sin().to(device=self.device, dtype=dtype)

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> Layer:
        p = f"model.layers.{i}."
        bias = None
        if self.arch.qkv_bias:
            bias = torch.cat([w[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        linear = self.ops.linear
        return Layer(
            ln1=w[p + "input_layernorm.weight"],
            qkv=linear(torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]), bias),
            o=linear(w[p + "self_attn.o_proj.weight"]),
            ln2=w[p + "post_attention_layernorm.weight"],
            gate_up=linear(torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])),
            down=linear(w[p + "mlp.down_proj.weight"]),
        )

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
        for i, ly in enumerate(self.layers):
            h = self._norm(x, ly.ln1)
            qkv = ly.qkv(h)  # [T, q + 2kv]
            if lora is not None:
                lora.apply_group(i, "qkv", h, qkv, mask)
            attn = attend(i, qkv)  # [T, q]
            ly.o.add_to(x, attn)  # the residual add fused into the projection: x += attn · Woᵀ
            if lora is not None:
                lora.apply_group(i, "o", attn, x, mask)
            h = self._norm(x, ly.ln2)
            gu = ly.gate_up(h)  # [T, 2I]
            if lora is not None:
                lora.apply_group(i, "gate_up", h, gu, mask)
            act = self.ops.silu_mul(gu)  # [T, I]
            ly.down.add_to(x, act)
            if lora is not None:
                lora.apply_group(i, "down", act, x, mask)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, V] of the given (already selected) positions."""
        return self.lm_head(self._norm(hidden, self.norm)).float()

    @torch.inference_mode()
    def prefill(
        self,
        prompts: list[torch.Tensor],
        rows: list[int],
        cache: KVCache,
        lora: LoraBatch | GroupedLoraBatch | None = None,
        adapters: list[int] | None = None,
        context: dict[int, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Run whole prompts (each [T_i], from position 0) into cache rows `rows`; float32 logits [P, V] of
        each prompt's last token. `adapters[i]`: prompt i's index into `lora` (-1: base). For each prompt
        index i in `context`, `context[i]` is set to its logits at every position [T_i, V]
        (OutputConfig.return_context_logits); the other prompts cost no extra LM-head rows.

        The prompts are one forward: their tokens are concatenated, so every projection and LoRA product reads
        its weights once for all of them; attention stays within each prompt.
        """
        lengths = [p.shape[0] for p in prompts]
        ends = torch.tensor(lengths).cumsum(0).tolist()
        ids = torch.cat(prompts)  # [ΣT]
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        mask = None
        if lora is not None:
            owner = [torch.full((n,), a, device=self.device) for n, a in zip(lengths, adapters, strict=True)]
            mask = lora.mask(torch.cat(owner))

        def attend(layer, qkv):
            q, k, v = self._split_rope(qkv, positions)  # [ΣT, heads, hd], [ΣT, kv, hd] x2
            out = torch.empty(qkv.shape[0], self.q_dim, dtype=qkv.dtype, device=qkv.device)
            for row, end, n in zip(rows, ends, lengths, strict=True):
                span = slice(end - n, end)
                cache.write_prompt(layer, row, k[span], v[span])
                o = F.scaled_dot_product_attention(
                    q[span].transpose(0, 1)[None],
                    k[span].transpose(0, 1)[None],
                    v[span].transpose(0, 1)[None],
                    is_causal=True,
                    enable_gqa=True,
                )  # [1, heads, n, hd]
                out[span] = o[0].transpose(0, 1).reshape(n, self.q_dim)
            return out

        hidden = self._forward(ids, attend, lora, mask)
        for i in context or {}:
            context[i] = self.logits(hidden[ends[i] - lengths[i] : ends[i]])  # [T_i, V]
        return self.logits(hidden[[e - 1 for e in ends]])

    @torch.inference_mode()
    def decode(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        lora: LoraBatch | GroupedLoraBatch | None = None,
        token_adapter: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token for each of rows 0..B-1: `ids` [B] at `positions` [B]; float32 logits [B, V]."""
        a = self.arch
        mask = lora.mask(token_adapter) if lora is not None else None
        shape = (a.num_heads, a.num_kv_heads, a.head_dim)

        def attend(layer, qkv):
            return self.ops.attend_decode(qkv, self.cos, self.sin, positions, cache, layer, shape)

        hidden = self._forward(ids, attend, lora, mask)
        return self.logits(hidden)
