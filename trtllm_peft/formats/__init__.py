"""On-disk adapter formats. Each module owns one format: `detect(dir)`, `load(dir, spec)`, `save(...)`.

`load()` here is the edge: whatever the format, out comes one canonical `LoraAdapter`, or an AdapterError.
Any other exception while reading an adapter (a bug, a deep recursion, memory) becomes an AdapterFormatError
here, so that a server marks the adapter invalid until its files change instead of answering 500 and
retrying the same files on every request.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from trtllm_peft.errors import AdapterError, AdapterFormatError
from trtllm_peft.lora import LoraAdapter, ModelSpec, dora, fit_to_spec


def _registry() -> dict[str, ModuleType]:
    from trtllm_peft.formats import hf_peft, nemo, trtllm

    return {"hf": hf_peft, "nemo": nemo, "trtllm": trtllm}


FORMAT_NAMES = ("hf", "nemo", "trtllm")


def detect(path: str | Path) -> str:
    """Name of the format of adapter directory `path`; AdapterFormatError when it is none of them."""
    p = Path(path)
    if not p.exists():
        raise AdapterFormatError(p, "does not exist")
    if not p.is_dir():
        raise AdapterFormatError(p, "is not a directory (an adapter is a directory of files)")
    for name, module in _registry().items():
        if module.detect(p):
            return name
    files = sorted(x.name for x in p.iterdir())[:10]
    if not files:
        raise AdapterFormatError(p, "empty directory: no adapter files")
    raise AdapterFormatError(
        p,
        "no adapter found: expected adapter_config.json + adapter_model.safetensors|bin (Hugging Face PEFT), "
        f"one .nemo file (NeMo), or model.lora_config.npy + model.lora_weights.npy (TensorRT-LLM); found {files}",
    )


def load(path: str | Path, spec: ModelSpec | None = None) -> LoraAdapter:
    """Read the adapter in directory `path`, whatever its format. TensorRT-LLM files need `spec`."""
    with adapter_errors(path):
        fmt = detect(path)
        return _registry()[fmt].load(Path(path), spec)


def load_for_engine(path: str | Path, spec: ModelSpec, base: dora.WeightOf | None = None) -> LoraAdapter:
    """Read and fit to the engine: fused modules split, every incompatibility raised at once.

    DoRA magnitudes come out normalized, as TensorRT-LLM's rows take them: `base` (the engine's weights,
    engine/base_weights.py) is needed when the file holds them as trained (a PEFT adapter).
    """
    adapter = load(path, spec)
    with adapter_errors(path):
        return dora.normalized(fit_to_spec(adapter, spec), base)


@contextlib.contextmanager
def adapter_errors(path: str | Path) -> Iterator[None]:
    """Every exception but an AdapterError becomes one, naming its kind (never the files' content)."""
    try:
        yield
    except AdapterError:
        raise
    except RecursionError:
        raise AdapterFormatError(path, "nested too deeply to read (a hostile or corrupt file?)") from None
    except MemoryError:
        raise AdapterFormatError(path, "needs more memory to read than there is (corrupt sizes?)") from None
    except Exception as e:
        logging.getLogger(__name__).debug("reading adapter %s failed", path, exc_info=True)
        raise AdapterFormatError(path, f"could not be read ({type(e).__name__})") from None


# The form each format stores DoRA magnitudes in (NeMo's LoRA checkpoints have none: nemo.save refuses).
_NORMALIZED = {"hf": False, "trtllm": True}


def save(
    adapter: LoraAdapter, out: str | Path, fmt: str, spec: ModelSpec, base: dora.WeightOf | None = None
) -> list[Path]:
    """Write `adapter` in format `fmt` into directory `out`; returns the files written.

    DoRA magnitudes are converted to the format's form (needs `base` when they are in the other one).
    """
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMAT_NAMES)}")
    if fmt in _NORMALIZED:
        adapter = dora.in_form(adapter, _NORMALIZED[fmt], base)
    return _registry()[fmt].save(adapter, Path(out), spec)
