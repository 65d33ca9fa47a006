"""Triton's protocols: KServe v2 HTTP routes, tensor codecs, stock model emulation, client LoRA task ids."""
