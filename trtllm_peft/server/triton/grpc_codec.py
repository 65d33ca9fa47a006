"""KServe v2 gRPC messages (tritonclient's service_pb2, grpc_service.proto) to and from our Tensors.

Inputs come either all as `raw_input_contents` (what tritonclient sends: little-endian bytes, BYTES
elements 4-byte-length-prefixed, BF16 as its bits) or each in its typed `contents` field; outputs always
go back as `raw_output_contents`, in output order, as Triton does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from trtllm_peft.server.triton.tensors import NUMPY_TYPES, Tensor, TritonProtocolError, from_raw, to_raw

# typed contents field of each datatype (grpc_service.proto InferTensorContents); FP16 / BF16 are raw only
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def request_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """Inputs by name; Triton's errors for a mix of raw and typed contents or a duplicated name."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise TritonProtocolError(
            f"expected {len(request.inputs)} raw_input_contents (one per input), got {len(raw)}"
        )
    inputs: dict[str, Tensor] = {}
    for i, spec in enumerate(request.inputs):
        shape = [int(d) for d in spec.shape]
        tensor = from_raw(spec.name, spec.datatype, raw[i], shape) if raw else _typed(spec, shape)
        if spec.name in inputs:
            raise TritonProtocolError(f"input '{spec.name}' is given twice")
        inputs[spec.name] = tensor
    return inputs


def _typed(spec: pb.ModelInferRequest.InferInputTensor, shape: list[int]) -> Tensor:
    field = _CONTENTS.get(spec.datatype)
    if field is None:
        raise TritonProtocolError(f"input '{spec.name}': datatype '{spec.datatype}' needs raw_input_contents")
    values = list(getattr(spec.contents, field))
    if spec.datatype == "BYTES":
        data = np.empty(len(values), dtype=object)
        data[:] = values
    else:
        data = np.array(values, dtype=NUMPY_TYPES[spec.datatype])
    count = int(np.prod(shape)) if shape else 1
    if data.size != count or any(d < 0 for d in shape):
        raise TritonProtocolError(
            f"input '{spec.name}' has {data.size} elements, its shape {shape} needs {count}"
        )
    return Tensor(spec.name, spec.datatype, data.reshape(shape))


def requested_outputs(request: pb.ModelInferRequest) -> list[str] | None:
    return [o.name for o in request.outputs] or None


def infer_response(
    request: pb.ModelInferRequest, tensors: list[Tensor], params: dict[str, Any] | None = None
) -> pb.ModelInferResponse:
    """The response to `request` carrying `tensors` (raw), plus bool parameters such as
    triton_final_response."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version or "1", id=request.id
    )
    for t in tensors:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        response.raw_output_contents.append(to_raw(t))
    for key, value in (params or {}).items():
        response.parameters[key].bool_param = bool(value)
    return response
