"""bench/engine.py's side of the OpenVINO GenAI peer (`--peer openvino`): export once, start the worker
(bench/openvino_peer.py in `.venv-openvino`, made by `make openvino`), and time its cases like ours.

The worker times each `generate` call itself and the runners return those seconds, so the pipe round trip
is not counted. The IR is exported from the same checkpoint view transformers loads (the engine's own
safetensors) with fp32 weights, no compression; bfloat16 is OpenVINO's inference precision hint on it
(bfloat16 values are exact in fp32, so the weights are the same numbers).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from engine_cases import N_ADAPTERS, prefill_prompts, prompts

from trtllm_peft.engine.engine_dir import WEIGHTS_FILE, EngineDir, hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"
WORKER = ROOT / "bench" / "openvino_peer.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# what the table says OpenVINO does for each case
HOW = {
    "base": "one generate() call, B prompts, continuous batching",
    "1 adapter": "one call, B prompts, one adapter",
    f"{N_ADAPTERS} distinct adapters": f"{N_ADAPTERS} calls of B/{N_ADAPTERS} prompts, one adapter each "
    "(one adapter set per call)",
}


def check_installed() -> None:
    if not VENV_PYTHON.is_file():
        raise SystemExit(f"--peer openvino needs {VENV_PYTHON.parent.parent.name}: run `make openvino` first")


def exported(engine: Path) -> Path:
    """engines/openvino/<engine name>: the OpenVINO IR of `engine`'s weights, exported on first use (and
    again when the engine's weights file changes)."""
    out = ROOT / "engines" / "openvino" / engine.name
    src = (engine / WEIGHTS_FILE).stat()
    stamp = f"{(engine / WEIGHTS_FILE).resolve()} {src.st_size} {src.st_mtime_ns}\n"
    source = out / ".source"
    if (out / "openvino_model.xml").is_file() and source.is_file() and source.read_text() == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="ov_view_") as tmp:
        e = EngineDir.open(engine)
        view = hf_checkpoint(e, Path(tmp))
        for name in TOKENIZER_FILES:  # the pipeline loads the converted tokenizer (unused: ids go in)
            if (e.path / name).is_file():
                shutil.copy(e.path / name, view / name)
        print(f"  exporting {engine.name} to OpenVINO IR (fp32 weights, no compression) ...", flush=True)
        subprocess.run([str(VENV_PYTHON), str(WORKER), "export", str(view), str(out)], check=True)
    (out / ".source").write_text(stamp)
    return out


class OpenVinoPeer:
    """The worker process for one engine and dtype, with `adapter_dirs` registered (PEFT directories)."""

    def __init__(
        self, engine: Path, dtype: str, adapter_dirs: list[Path], threads: int, max_batch: int
    ) -> None:
        cmd = [str(VENV_PYTHON), str(WORKER), "serve", str(exported(engine)), "--dtype", dtype]
        cmd += ["--threads", str(threads), "--max-batch", str(max_batch)]
        for d in adapter_dirs:
            cmd += ["--adapter", str(d / "adapter_model.safetensors")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if not ready.strip().startswith('{"ready"'):
            self.close()
            raise RuntimeError(f"OpenVINO worker did not start: {ready!r}")

    def generate(self, ps: list[list[int]], tokens: int, adapter: int | None, return_tokens=False) -> dict:
        req = {
            "op": "run",
            "prompts": ps,
            "tokens": tokens,
            "adapter": adapter,
            "return_tokens": return_tokens,
        }
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline() or '{"error": "worker exited"}')
        if "error" in reply:
            raise RuntimeError(f"OpenVINO worker: {reply['error']}")
        return reply

    def runner(self, batch: int, n_adapters: int):
        """run(tokens) → seconds spent in generate(): base / one adapter in one call; n distinct adapters in
        n calls (request i has adapter i % n), one after another."""
        ps = prompts(batch)
        groups = [(None, ps)] if n_adapters == 0 else [(0, ps)] if n_adapters == 1 else [
            (j, ps[j::n_adapters]) for j in range(n_adapters)
        ]  # fmt: skip

        def run(tokens: int) -> float:
            return sum(self.generate(g, tokens, a)["seconds"] for a, g in groups if g)

        run(2)
        return run

    def prefill(self):
        fresh = prefill_prompts()

        def run(tokens: int) -> float:
            return self.generate([next(fresh)], tokens, None)["seconds"]

        run(1)
        return run

    def tokens(self, batch: int, tokens: int) -> list[list[int]]:
        return self.generate(prompts(batch), tokens, None, return_tokens=True)["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    """Greedy agreement on the base model: identical sequences, and tokens before the first divergence."""
    same, prefix, total = 0, 0, 0
    for a, b in zip(ours, theirs, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same += a == b
        prefix += k
        total += len(a)
    return {"sequences": same / len(ours), "tokens_before_divergence": prefix / total}
