#!/usr/bin/env python3
"""Convert a Hugging Face PEFT LoRA adapter into TensorRT-LLM's runtime tensors.

Drop-in for TensorRT-LLM's examples/hf_lora_convert.py: the same flags and the same two files,
model.lora_weights.npy [1, N, W] (B pre-multiplied by the LoRA scale) and model.lora_config.npy
[1, N, 4] int32. Read with trtllm_peft: rsLoRA, rank_pattern and alpha_pattern are honoured, nothing in
the files is executed, and bad input is one clear error (exit code 2) instead of a traceback.
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
        "--in-file", "-i", type=Path, required=True, help="Hugging Face PEFT adapter directory"
    )
    parser.add_argument("--verbose", action="store_true", help="print every module and rank")
    parser.add_argument(
        "--storage-type",
        default="float16",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the weights: must be the engine's dtype (default: float16)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # copying bytes: more OpenMP threads only wait on each other on a busy machine
    try:
        adapter = convert(args.in_file, args.out_dir, args.storage_type, expect="hf")
    except (TrtllmPeftError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(adapter, args.out_dir, args.storage_type, verbose=args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
