"""Time of converting a Llama-3-8B-shaped HF PEFT adapter to TensorRT-LLM's .npy files, next to reading it.

python bench/convert.py [--ranks 16 64] [--repeats 5] [--dtype float16]

For each rank, a real PEFT adapter directory is written into a temporary directory (adapter_config.json by
peft.LoraConfig, adapter_model.safetensors from random tensors; no model is built): 32 layers, the 7
projections, hidden 4096, 32 heads / 8 kv heads of 128, intermediate 14336, lora_alpha = 2r (so the scale,
2, is folded into B). Then, best of --repeats after a warm-up, page cache warm for all:
  read       safetensors load_file + json of the config (load_file maps the file: bytes are not read yet)
  read+bytes the same with load_file(backend="pread"), which reads every byte into memory
  copy floor load_file + write every tensor's bytes, unchanged, to one new file: the least any converter
             writing the same bytes pays (the .npy adds zero padding, left as holes, and B·scale)
  convert    the converters' work: trtllm.convert = formats.load + fold + pack + write model.lora_*.npy
  np.save    the same, done the straightforward way (as TensorRT-LLM's hf_lora_convert.py ends): the [N, W]
             tensor from lora.pack, then np.save of it
  read back  formats.trtllm.load of the written files (np.load + unpack)
The target is convert <= 1.5x read.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trtllm_peft import formats
from trtllm_peft.formats import trtllm
from trtllm_peft.lora import ModelSpec, pack

LLAMA3_8B = ModelSpec(
    num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336
)
HF_MODULES = {  # HF name -> (parent, TensorRT-LLM name)
    "q_proj": ("self_attn", "attn_q"),
    "k_proj": ("self_attn", "attn_k"),
    "v_proj": ("self_attn", "attn_v"),
    "o_proj": ("self_attn", "attn_dense"),
    "gate_proj": ("mlp", "mlp_h_to_4h"),
    "up_proj": ("mlp", "mlp_gate"),
    "down_proj": ("mlp", "mlp_4h_to_h"),
}
TARGET = 1.5


def make_adapter(d: Path, rank: int, dtype: torch.dtype) -> int:
    """A PEFT adapter directory for LLAMA3_8B; returns the bytes of its weights file."""
    from peft import LoraConfig

    d.mkdir(parents=True)
    LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(HF_MODULES), task_type="CAUSAL_LM"
    ).save_pretrained(str(d))
    gen = torch.Generator().manual_seed(rank)
    rand = lambda *shape: (torch.randn(shape, generator=gen) * 0.02).to(dtype)  # noqa: E731
    tensors = {}
    for layer in range(LLAMA3_8B.num_layers):
        for hf, (parent, module) in HF_MODULES.items():
            d_in, d_out = LLAMA3_8B.module_dims(module)
            name = f"base_model.model.model.layers.{layer}.{parent}.{hf}"
            tensors[f"{name}.lora_A.weight"] = rand(rank, d_in)  # [r, in]
            tensors[f"{name}.lora_B.weight"] = rand(d_out, rank)  # [out, r]
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return (d / "adapter_model.safetensors").stat().st_size


def best(fn, repeats: int, setup=lambda: None) -> float:
    """Best time of `repeats` calls of fn after one warm-up call; `setup` runs untimed before each."""
    setup()
    fn()  # warm-up: page cache, allocator, lazy imports
    times = []
    for _ in range(repeats):
        setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def rmtree(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)


def plain_read(d: Path, backend: str = "mmap") -> None:
    json.loads((d / "adapter_config.json").read_text())
    load_file(str(d / "adapter_model.safetensors"), backend=backend)


def copy_floor(src: Path, out: Path) -> None:
    with open(out, "wb") as f:
        for t in load_file(str(src / "adapter_model.safetensors")).values():
            f.write(t.reshape(-1).view(torch.uint8).numpy())


def pack_and_save(src: Path, out: Path, dtype: str) -> None:
    """HF -> .npy through an in-memory [N, W] array: what write_npy streams instead."""
    packed = pack(formats.load(src), dtype)
    weights = packed.weights
    if weights.dtype == torch.bfloat16:  # tensorrt_llm._utils.torch_to_numpy
        weights = weights.view(torch.int16).numpy().view(trtllm.NP_BFLOAT16)
    else:
        weights = weights.numpy()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / trtllm.WEIGHTS_FILE, weights[None])
    np.save(out / trtllm.CONFIG_FILE, packed.config.numpy()[None])


def measure(root: Path, rank: int, dtype: str, repeats: int) -> dict:
    src, out = root / f"r{rank}", root / f"r{rank}-trtllm"
    size = make_adapter(src, rank, getattr(torch, dtype))
    spec = LLAMA3_8B.with_limits(dtype=dtype, max_lora_rank=rank)
    row = {"rank": rank, "in_mb": size / 1e6}
    row["read"] = best(lambda: plain_read(src), repeats)
    row["read_bytes"] = best(lambda: plain_read(src, "pread"), repeats)
    floor = root / f"r{rank}.copy"
    row["floor"] = best(lambda: copy_floor(src, floor), repeats, lambda: floor.unlink(missing_ok=True))
    floor.unlink()
    # each conversion writes a fresh directory (deleting the last one's 0.1-0.5 GB is not conversion work)
    row["convert"] = best(lambda: trtllm.convert(src, out, dtype, expect="hf"), repeats, lambda: rmtree(out))
    row["out_mb"] = (out / trtllm.WEIGHTS_FILE).stat().st_size / 1e6
    plain = root / f"r{rank}-np-save"
    row["np_save"] = best(lambda: pack_and_save(src, plain, dtype), repeats, lambda: rmtree(plain))
    assert (plain / trtllm.WEIGHTS_FILE).read_bytes() == (out / trtllm.WEIGHTS_FILE).read_bytes()
    row["read_back"] = best(lambda: trtllm.load(out, spec), repeats)
    return row


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--ranks", type=int, nargs="+", default=[16, 64], help="LoRA ranks to measure (default 16 64)"
    )
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed runs after one warm-up; the best counts (default 5)"
    )
    ap.add_argument(
        "--dtype",
        choices=["float16", "bfloat16"],
        default="float16",
        help="adapter and output dtype (float16)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads; the converter scripts use 1 (default 1)"
    )
    ap.add_argument(
        "--tmp", type=Path, default=None, help="where to write the adapters (default: system temp)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        rows = [measure(Path(tmp), r, args.dtype, args.repeats) for r in args.ranks]
    print(
        f"Llama-3-8B-shaped adapter, 7 modules x 32 layers, {args.dtype}, best of {args.repeats}, "
        f"{args.threads} torch thread(s)\n"
    )
    print(
        "| rank | adapter | .npy written | read (mmap) | read+bytes | copy floor | convert | np.save way | read back "
        "| convert / read | convert / read+bytes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        times = " | ".join(
            _ms(r[k]) for k in ("read", "read_bytes", "floor", "convert", "np_save", "read_back")
        )
        print(
            f"| {r['rank']} | {r['in_mb']:.0f} MB | {r['out_mb']:.0f} MB | {times} "
            f"| {r['convert'] / r['read']:.1f}x | {r['convert'] / r['read_bytes']:.2f}x |"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\npeak memory (RSS): {peak:.2f} GB")
    for r in rows:
        for base in ("read", "read_bytes"):
            ratio = r["convert"] / r[base]
            verdict = "met" if ratio <= TARGET else "MISSED"
            print(
                f"target convert <= {TARGET}x {base.replace('_', '+')}, rank {r['rank']}: {ratio:.2f}x {verdict}"
            )


if __name__ == "__main__":
    main()
