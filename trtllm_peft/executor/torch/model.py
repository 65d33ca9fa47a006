"""Our own Llama-family forward pass (Llama 2/3, Mistral, Qwen2, SmolLM2) over a preallocated KV cache.

Not transformers' generate: per layer the step is a handful of large ops — RMSNorm, one fused q/k/v
matmul (+ bias for Qwen2), RoPE on q and k together, one attention call, o-proj, one fused gate/up matmul,
SiLU·up, down-proj — plus the LoRA group ops of lora_ops.py when the batch has adapters. Logits are
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
from trtllm_peft.executor.torch.lora_ops import LoraBatch


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
    """Weights fused at load; `prefill` one sequence into a cache row, `decode` one token for rows 0..B-1."""

    def __init__(
        self, arch: ArchConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device, max_seq_len: int
    ) -> None:
        self.arch, self.dtype, self.device = arch, dtype, torch.device(device)
        w = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        self.embed = w["model.embed_tokens.weight"]  # [V, H]
        self.lm_head = Linear(self.embed if arch.tie_word_embeddings else w["lm_head.weight"])  # [V, H]
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
        return Layer(
            ln1=w[p + "input_layernorm.weight"],
            qkv=Linear(torch.cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]), bias),
            o=Linear(w[p + "self_attn.o_proj.weight"]),
            ln2=w[p + "post_attention_layernorm.weight"],
            gate_up=Linear(torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])),
            down=Linear(w[p + "mlp.down_proj.weight"]),
        )

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, heads, hd] rotated at `positions` [T] (rotate-half convention, as HF Llama)."""
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm computed in float32 then cast, as transformers' LlamaRMSNorm."""
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.arch.rms_norm_eps)
        return weight * h.to(x.dtype)

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        attend,
        lora: LoraBatch | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Hidden states [T, H] after the final norm; `attend(layer, q, k, v) -> [T, q_dim]`."""
        a = self.arch
        x = self.embed[ids]  # [T, H]
        t = ids.shape[0]
        for i, ly in enumerate(self.layers):
            h = self._norm(x, ly.ln1)
            qkv = ly.qkv(h)  # [T, q + 2kv]
            if lora is not None:
                lora.apply_group(i, "qkv", h, qkv, mask)
            qk = self._rope(
                qkv[:, : self.q_dim + self.kv_dim].view(t, a.num_heads + a.num_kv_heads, a.head_dim),
                positions,
            )
            q, k = qk[:, : a.num_heads], qk[:, a.num_heads :]
            v = qkv[:, self.q_dim + self.kv_dim :].view(t, a.num_kv_heads, a.head_dim)
            attn = attend(i, q, k, v)  # [T, q]
            o = ly.o(attn)
            if lora is not None:
                lora.apply_group(i, "o", attn, o, mask)
            x = x + o
            h = self._norm(x, ly.ln2)
            gu = ly.gate_up(h)  # [T, 2I]
            if lora is not None:
                lora.apply_group(i, "gate_up", h, gu, mask)
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate) * up
            d = ly.down(act)
            if lora is not None:
                lora.apply_group(i, "down", act, d, mask)
            x = x + d
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, V] of the given (already selected) positions."""
        return self.lm_head(self._norm(hidden, self.norm)).float()

    @torch.inference_mode()
    def prefill(
        self,
        ids: torch.Tensor,
        row: int,
        cache: KVCache,
        lora: LoraBatch | None = None,
        adapter_index: int = -1,
    ) -> torch.Tensor:
        """Run a whole prompt `ids` [T] from position 0 into cache row `row`; logits [V] of the last token."""
        t = ids.shape[0]
        positions = torch.arange(t, device=self.device)
        mask = lora.mask(torch.full((t,), adapter_index, device=self.device)) if lora is not None else None

        def attend(layer, q, k, v):
            cache.write_prompt(layer, row, k, v)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                is_causal=True,
                enable_gqa=True,
            )
            return out[0].transpose(0, 1).reshape(t, self.q_dim)

        hidden = self._forward(ids, positions, attend, lora, mask)
        return self.logits(hidden[-1:])[0]

    @torch.inference_mode()
    def decode(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        lora: LoraBatch | None = None,
        token_adapter: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token for each of rows 0..B-1: `ids` [B] at `positions` [B]; float32 logits [B, V]."""
        a, b = self.arch, ids.shape[0]
        length = int(positions.max()) + 1
        valid = torch.arange(length, device=self.device)[None, :] <= positions[:, None]  # [B, L]
        attn_mask = valid[:, None, None, :]  # [B, 1, 1, L]
        mask = lora.mask(token_adapter) if lora is not None else None
        groups = a.num_heads // a.num_kv_heads

        def attend(layer, q, k, v):
            keys, values = cache.write_step(layer, positions, k, v, length)  # [B, kv, L, hd]
            # GQA without repeating K/V: the query heads of one kv head become that head's query "length".
            qg = q.reshape(b, a.num_kv_heads, groups, a.head_dim)
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=attn_mask)  # [B, kv, g, hd]
            return out.reshape(b, self.q_dim)

        hidden = self._forward(ids, positions, attend, lora, mask)
        return self.logits(hidden)
