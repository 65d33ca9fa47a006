#!/usr/bin/env python3
"""Convert a NeMo 1.x `.nemo` LoRA adapter into TensorRT-LLM's runtime tensors.

Drop-in for the C++-runtime path of TensorRT-LLM's old examples/gpt/nemo_lora_convert.py: the same
flags, and the same two files, model.lora_weights.npy [1, N, W] and model.lora_config.npy [1, N, 4] int32.
Unlike that script, alpha/adapter_dim is folded into B, tensor/pipeline-parallel shards are merged, fused
QKV is written in [Q; K; V] row order, and bad input is one clear error (exit code 2).
"""

import argparse
import sys
from pathlib import Path

import torch

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.formats.trtllm import convert, describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", "-o", type=Path, required=True, help="directory for model.lora_*.npy")
    parser.add_argument(
        "--in-file", "-i", type=Path, required=True, help="a .nemo file, or a directory holding one"
    )
    parser.add_argument("--verbose", action="store_true", help="print every module and rank")
    parser.add_argument("--customization-id", default="lora", help="accepted for compatibility; unused")
    parser.add_argument(
        "--write-cpp-runtime-tensors",
        action="store_true",
        help="accepted for compatibility: the runtime tensors are always written (the per-layer .bin files of "
        "TensorRT-LLM's retired Python runtime are not)",
    )
    parser.add_argument(
        "--storage-type",
        default="float16",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the weights: must be the engine's dtype (default: float16)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # copying bytes: more OpenMP threads only wait on each other on a busy machine
    try:
        adapter = convert(args.in_file, args.out_dir, args.storage_type, expect="nemo")
    except (TrtllmPeftError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(adapter, args.out_dir, args.storage_type, verbose=args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
