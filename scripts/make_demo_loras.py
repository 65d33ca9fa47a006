"""Write the demo adapters into ./loras (or DIR): one trained LoRA, in the three formats (`make demo-loras`).

  smollm2-math-hf      the Hugging Face PEFT adapter trained by scripts/train_demo_lora.py (copied from
                       demo/loras-src/smollm2-math-hf): GSM8K-style answers ending in `#### N`
  smollm2-math-nemo    the same LoRA as a NeMo `.nemo` (a fused attention_qkv adapter, alpha = adapter_dim)
  smollm2-math-trtllm  the same LoRA as TensorRT-LLM tensors (model.lora_weights.npy, model.lora_config.npy)
                       for the engine's geometry and dtype

Point the server at the directory (NIM_PEFT_SOURCE=./loras) and ask any of the three names the same
question: the answers are the same. Nothing is trained here; the conversions are those of
`trtllm-peft convert SRC --to nemo|trtllm --base ENGINE`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trtllm_peft import formats  # noqa: E402
from trtllm_peft.errors import TrtllmPeftError  # noqa: E402
from trtllm_peft.lora import load_spec  # noqa: E402

SOURCES = REPO / "demo" / "loras-src"
DEMOS = {"smollm2-math": SOURCES / "smollm2-math-hf"}  # demo name -> trained HF PEFT adapter
FORMATS = ("hf", "nemo", "trtllm")


def make(out: Path, engine: Path) -> list[Path]:
    """Write every demo in every format under `out`, replacing earlier copies; returns the directories."""
    spec = load_spec(engine)
    written = []
    for name, src in DEMOS.items():
        adapter = formats.load_for_engine(
            src, spec
        )  # the checks the server makes, before anything is written
        for fmt in FORMATS:
            dest = out / f"{name}-{fmt}"
            if dest.exists():
                shutil.rmtree(dest)
            if fmt == "hf":
                shutil.copytree(src, dest)  # the trained files themselves, byte for byte
            else:
                formats.save(adapter, dest, fmt, spec)
            written.append(dest)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("loras"), help="directory to write (./loras)")
    ap.add_argument("--engine", type=Path, default=REPO / "engines" / "smollm2-135m", help="engine directory")
    args = ap.parse_args()
    missing = [str(src) for src in DEMOS.values() if not src.is_dir()]
    if missing:
        print(f"missing trained adapter(s) {', '.join(missing)}: run `make train-demo-lora`", file=sys.stderr)
        return 2
    try:
        written = make(args.out, args.engine)
    except TrtllmPeftError as e:
        print(f"make_demo_loras: {e}", file=sys.stderr)
        return 2
    for dest in written:
        size = sum(f.stat().st_size for f in dest.iterdir())
        print(f"{dest}  ({formats.detect(dest)}, {size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
