"""KServe v2 tensors on the wire: JSON `data` and Triton's binary tensor data extension, both ways.

Request body: a JSON header, then (binary extension) the raw bytes of each input whose
`parameters.binary_data_size` is set, in input order; the header's length is in the HTTP header
`Inference-Header-Content-Length`. BYTES elements are each a 4-byte little-endian length then the bytes.
Responses use the same layout when the client asked for binary outputs (tritonclient does by default).
Numeric tensors are numpy arrays; BF16, which numpy lacks, travels as its raw uint16 bits.
Spec: kserve/open-inference-protocol (HTTP/REST) and triton-inference-server/server
docs/protocol/extension_binary_data.md.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.server.json_body import parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"

NUMPY_TYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(np.uint16),  # raw bits
}
TORCH_TYPES = {"FP16": torch.float16, "FP32": torch.float32, "BF16": torch.bfloat16}


class TritonProtocolError(TrtllmPeftError):
    """A request that breaks the v2 protocol (Triton answers these with 400)."""

    http_status = 400


@dataclass
class Tensor:
    """One named tensor: `data` is a numpy array (numeric types) or a numpy object array of bytes (BYTES)."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)

    def to_torch(self) -> torch.Tensor:
        """As a CPU torch tensor (BF16 reinterpreted from its bits)."""
        if self.datatype == "BYTES":
            raise TritonProtocolError(f"input '{self.name}' is BYTES, expected a numeric tensor")
        if self.datatype == "BF16":
            return torch.from_numpy(self.data.copy()).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(self.data).copy())

    def scalar(self) -> Any:
        """The single element of a [1], [1, 1] … tensor, as a Python value (str for BYTES)."""
        if self.data.size != 1:
            raise TritonProtocolError(f"input '{self.name}' must hold one element, got shape {self.shape}")
        value = self.data.reshape(-1)[0]
        if self.datatype == "BYTES":
            return _text(self.name, value)
        if self.datatype == "BF16":
            return float(self.to_torch().reshape(-1)[0])
        return value.item()

    def strings(self) -> list[str]:
        """Every element of a BYTES tensor, decoded as UTF-8."""
        if self.datatype != "BYTES":
            raise TritonProtocolError(f"input '{self.name}' must be BYTES, got {self.datatype}")
        return [_text(self.name, v) for v in self.data.reshape(-1)]


def _text(name: str, value: Any) -> str:
    """A BYTES element as text: valid UTF-8 and no lone surrogate (the tokenizer takes neither)."""
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        text.encode("utf-8")
    except UnicodeError as e:
        raise TritonProtocolError(f"input '{name}' is not valid UTF-8 text ({e.reason})") from None
    return text


def decode_request(
    body: bytes, headers, max_bytes: int = 64 << 20
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(the JSON header, inputs by name) of an infer request body, at most `max_bytes` once inflated."""
    encoding = (headers.get("content-encoding") or "").lower()
    if encoding in ("gzip", "deflate"):
        body = _inflate(body, encoding, max_bytes)
    raw_length = (headers.get(HEADER_LENGTH.lower()) or "").strip()
    if raw_length and not raw_length.isdigit():
        raise TritonProtocolError(f"{HEADER_LENGTH} must be a number of bytes, got {raw_length[:40]!r}")
    header_len = int(raw_length) if raw_length else len(body)
    if not 0 <= header_len <= len(body):
        raise TritonProtocolError(f"{HEADER_LENGTH} {header_len} exceeds the body ({len(body)} bytes)")
    header = parse_json(body[:header_len])
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise TritonProtocolError("the request JSON must be an object with an 'inputs' list")
    binary, offset, inputs = body[header_len:], 0, {}
    for spec in header["inputs"]:
        tensor, offset = _decode_input(spec, binary, offset)
        if tensor.name in inputs:
            raise TritonProtocolError(f"input '{tensor.name}' is given twice")
        inputs[tensor.name] = tensor
    if offset != len(binary):
        raise TritonProtocolError(f"{len(binary) - offset} unexpected bytes after the binary inputs")
    return header, inputs


def _inflate(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """Decompress, refusing (400) what inflates past `max_bytes`: a small gzip must not become gigabytes."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise TritonProtocolError(f"the {encoding} request body is corrupt ({e})") from None
    if len(out) > max_bytes:
        raise TritonProtocolError(f"the {encoding} request body inflates to more than {max_bytes} bytes")
    return out


def _decode_input(spec: Any, binary: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(spec, dict) or not {"name", "datatype", "shape"} <= spec.keys():
        raise TritonProtocolError("every input needs 'name', 'datatype' and 'shape'")
    name, datatype = str(spec["name"]), str(spec["datatype"])
    try:
        shape = [int(d) for d in spec["shape"]]
    except (TypeError, ValueError):
        raise TritonProtocolError(f"input '{name}' has a shape that is not a list of integers") from None
    if datatype != "BYTES" and datatype not in NUMPY_TYPES:
        raise TritonProtocolError(f"input '{name}' has unknown datatype '{datatype}'")
    if any(d < 0 for d in shape):
        raise TritonProtocolError(f"input '{name}' has a negative dimension in shape {shape}")
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        chunk = binary[offset : offset + int(size)]
        if len(chunk) != int(size):
            raise TritonProtocolError(f"input '{name}': binary data shorter than binary_data_size {size}")
        data, offset = _from_bytes(name, datatype, chunk), offset + int(size)
    elif "data" in spec:
        data = _from_json(name, datatype, spec["data"])
    else:
        raise TritonProtocolError(f"input '{name}' has neither 'data' nor binary data")
    count = int(np.prod(shape)) if shape else 1
    if data.size != count:
        raise TritonProtocolError(f"input '{name}' has {data.size} elements, its shape {shape} needs {count}")
    return Tensor(name, datatype, data.reshape(shape)), offset


def _from_bytes(name: str, datatype: str, chunk: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise TritonProtocolError(f"input '{name}': truncated BYTES element length")
            (n,) = struct.unpack_from("<I", chunk, pos)
            if pos + 4 + n > len(chunk):
                raise TritonProtocolError(f"input '{name}': BYTES element runs past its data")
            items.append(chunk[pos + 4 : pos + 4 + n])
            pos += 4 + n
        return _object_array(items)
    dtype = NUMPY_TYPES[datatype]
    if len(chunk) % dtype.itemsize:
        raise TritonProtocolError(f"input '{name}': {len(chunk)} bytes is not a whole number of {datatype}")
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype)


def _from_json(name: str, datatype: str, data: Any) -> np.ndarray:
    flat = list(_flatten(data))
    try:
        if datatype == "BYTES":
            return _object_array([v.encode() if isinstance(v, str) else bytes(v) for v in flat])
        if datatype == "BF16":
            bits = torch.tensor([float(v) for v in flat], dtype=torch.bfloat16).view(torch.int16)
            return bits.numpy().view(np.uint16)
        return np.array(flat, dtype=NUMPY_TYPES[datatype])
    except (TypeError, ValueError, OverflowError) as e:
        raise TritonProtocolError(f"input '{name}': data is not {datatype} ({e})") from None


def _flatten(data: Any):
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _object_array(items: list[bytes]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def bytes_tensor(name: str, values: list[str], shape: list[int]) -> Tensor:
    """A BYTES output from strings."""
    return Tensor(name, "BYTES", _object_array([v.encode("utf-8") for v in values]).reshape(shape))


def encode_response(
    header: dict[str, Any], outputs: list[Tensor], binary: set[str]
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    specs, blobs = [], []
    for t in outputs:
        spec: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.name in binary:
            blob = _to_bytes(t)
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = to_json_value(t)
        specs.append(spec)
    head = json.dumps({**header, "outputs": specs}, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def _to_bytes(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in t.data.reshape(-1))
    return np.ascontiguousarray(t.data, dtype=NUMPY_TYPES[t.datatype].newbyteorder("<")).tobytes()


def to_json_value(t: Tensor) -> list[Any]:
    """Row-major flat list (strings for BYTES), as v2 JSON `data`."""
    if t.datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") for v in t.data.reshape(-1)]
    return t.data.reshape(-1).tolist()


def from_raw(name: str, datatype: str, chunk: bytes, shape: list[int]) -> Tensor:
    """A tensor from raw little-endian bytes (binary extension, gRPC raw_input_contents), shape checked."""
    if datatype != "BYTES" and datatype not in NUMPY_TYPES:
        raise TritonProtocolError(f"input '{name}' has unknown datatype '{datatype}'")
    if any(d < 0 for d in shape):
        raise TritonProtocolError(f"input '{name}' has a negative dimension in shape {shape}")
    data = _from_bytes(name, datatype, chunk)
    count = int(np.prod(shape)) if shape else 1
    if data.size != count:
        raise TritonProtocolError(f"input '{name}' has {data.size} elements, its shape {shape} needs {count}")
    return Tensor(name, datatype, data.reshape(shape))


def to_raw(t: Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (BYTES elements length-prefixed)."""
    return _to_bytes(t)
