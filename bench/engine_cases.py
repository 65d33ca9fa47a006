"""The cases bench/engine.py times: our executor and transformers (+ peft) on the same prompts and weights.

Each `*_runner` returns `run(tokens)`: one batch of greedy generations of exactly `tokens` new tokens. The
OpenVINO peer's runners are in bench/engine_openvino.py (it lives in its own virtual environment).
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import torch

from trtllm_peft.engine.engine_dir import EngineDir, hf_checkpoint
from trtllm_peft.executor.api import LoraConfig, Request
from trtllm_peft.executor.torch import TorchExecutor

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT_LEN, RANK, N_ADAPTERS = 16, 16, 8
PREFILL_LEN = 512  # the prefill column: time to first token of one prompt this long


def prompts(batch: int, length: int = PROMPT_LEN, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (batch, length), generator=g).tolist()


def prefill_prompts():
    """A new PREFILL_LEN-token prompt on every call: a repeated one would be served from the KV cache's
    reused blocks (ours) instead of being computed."""
    for seed in itertools.count(1):
        yield prompts(1, PREFILL_LEN, seed=seed)[0]


def prefill_flops(weights: dict[str, torch.Tensor], hf_config: dict) -> float:
    """FLOPs of one PREFILL_LEN-token prefill: every projection on every token, causal attention, and the LM
    head on the last token only (what both engines compute for the first token)."""
    embed = next(v.numel() for k, v in weights.items() if "embed_tokens" in k)
    linear = sum(v.numel() for v in weights.values() if v.dim() == 2) - embed
    n, layers = PREFILL_LEN, hf_config["num_hidden_layers"]
    heads_dim = hf_config["num_attention_heads"] * (
        hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    )
    attention = 2 * 2 * (n * (n + 1) / 2) * heads_dim * layers  # QKᵀ and PV over the causal triangle
    return 2 * n * linear + attention + 2 * embed


# ---- our engine ---------------------------------------------------------------------------------------


def _drain(ex: TorchExecutor, ids: list[int]) -> dict[int, list[int]]:
    out, left = {}, set(ids)
    while left:
        for r in ex.await_responses(timeout=600):
            assert not r.has_error(), r.error_msg
            if r.result.is_final:
                out[r.request_id] = r.result.output_token_ids[0]
            left.discard(r.request_id)
    return out


def ours_runner(ex: TorchExecutor, packed: list, batch: int, n_adapters: int, first_task: int = 1):
    """run(tokens): one batch through the executor, adapters i % n_adapters (weights sent once per task;
    task ids from `first_task`, so that two sets of adapters never share one)."""
    sent: set[int] = set()

    def lora(i: int):
        if not n_adapters:
            return None
        j = i % n_adapters
        if j in sent:
            return LoraConfig(first_task + j)
        sent.add(j)
        return LoraConfig(first_task + j, packed[j].weights, packed[j].config)

    def run(tokens: int) -> None:
        _drain(
            ex,
            ex.enqueue_requests(
                [Request(p, tokens, lora_config=lora(i)) for i, p in enumerate(prompts(batch))]
            ),
        )

    run(2)  # warm-up: adapters into the cache
    return run


def ours_tokens(ex: TorchExecutor, batch: int, tokens: int) -> list[list[int]]:
    """The base model's greedy continuations of `prompts(batch)` (new tokens only)."""
    ps = prompts(batch)
    ids = ex.enqueue_requests([Request(p, tokens) for p in ps])
    out = _drain(ex, ids)
    return [out[i][len(p) :] for i, p in zip(ids, ps, strict=True)]


def ours_prefill(ex: TorchExecutor):
    fresh = prefill_prompts()

    def run(tokens: int) -> None:
        _drain(ex, ex.enqueue_requests([Request(next(fresh), tokens)]))

    run(1)
    return run


# ---- transformers + peft ------------------------------------------------------------------------------


def hf_model(engine: Path, dtype: torch.dtype):
    """transformers' model on exactly the engine's weights (a checkpoint view, loaded by from_pretrained)."""
    from transformers import AutoModelForCausalLM

    view = hf_checkpoint(EngineDir.open(engine), Path(tempfile.mkdtemp(prefix="hf_view_")))
    return AutoModelForCausalLM.from_pretrained(str(view), dtype=dtype).eval()


def make_adapters(engine: Path, out: Path, dora: bool = False) -> list[Path]:
    """N_ADAPTERS real peft adapters (rank 16, all modules, random non-zero weights; DoRA: magnitudes too), saved."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    dirs = []
    for i in range(N_ADAPTERS):
        cfg = PeftLoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS, use_dora=dora)
        m = get_peft_model(hf_model(engine, torch.float32), cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_" in name:  # DoRA magnitudes: around their initial ‖W + s·B·A‖, random
                    p.copy_(p * (1 + 0.2 * torch.randn(p.shape, generator=g)) if "magnitude" in name else
                            torch.randn(p.shape, generator=g) * 0.02)  # fmt: skip
        d = out / f"{'dora' if dora else 'a'}{i}"
        m.save_pretrained(str(d))
        dirs.append(d)
    return dirs


def _generate(model, ids: torch.Tensor, tokens: int, **gen_kwargs) -> None:
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
            **gen_kwargs,
        )


def hf_runner(model, batch: int, **gen_kwargs):
    ids = torch.tensor(prompts(batch))

    def run(tokens: int) -> None:
        _generate(model, ids, tokens, **gen_kwargs)

    run(2)
    return run


def hf_prefill(model):
    fresh = prefill_prompts()

    def run(tokens: int) -> None:
        _generate(model, torch.tensor([next(fresh)]), tokens)

    run(1)
    return run


def peft_model(engine: Path, dtype: torch.dtype, dirs: list[Path]):
    from peft import PeftModel

    model = PeftModel.from_pretrained(
        hf_model(engine, dtype), str(dirs[0]), adapter_name="a0", torch_dtype=dtype
    )
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.set_adapter("a0")
    return model.eval()
