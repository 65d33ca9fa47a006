"""The narrowest stand-in of `triton_python_backend_utils`: the calls trtllm-peft's `peft` model makes.

`triton_python_backend_utils` exists only inside Triton's Python-backend stub process (it is not on PyPI).
Each name below mirrors triton-inference-server/python_backend @f9088ff (2026-07-17): the pybind11 classes of
src/pb_stub.cc (TritonError 1694-1743, InferenceRequest 1799-1884, Tensor 1886-1902, InferenceResponse
1904-1925, InferenceResponseSender 1927-1932) and the helpers of src/resources/triton_python_backend_utils.py
(get_input_tensor_by_name 123, get_output_tensor_by_name 146, using_decoupled_model_transaction_policy 217,
TRITONSERVER_RESPONSE_COMPLETE_FINAL 608). Rules enforced as the C++ does: BF16 has no NumPy view
(pb_tensor.cc AsNumpy 581-595), from_dlpack takes a capsule or an object with __dlpack__ (pb_tensor.cc
FromDLPack 400-475), a response sender's flags and counts (response_sender.cc 43-110). `exec` goes to the
models registered in server.py, which check requests against their config.pbtxt as Triton's core does.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
_NP_TO_TRITON = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.object_): "BYTES",
}
_TORCH_TO_TRITON = {
    torch.bfloat16: "BF16",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.int32: "INT32",
}


class TritonModelException(Exception):
    """pb_stub.cc 2010: what PythonBackendException surfaces as in Python."""


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = 1):  # default TRITONSERVER_ERROR_INTERNAL
        if message is None:
            raise TypeError("message must not be None")
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, array: np.ndarray):  # PbTensor::FromNumpy
        if not isinstance(array, np.ndarray):
            raise TypeError("Tensor(name, numpy.ndarray)")
        if array.dtype.kind in "SU":
            array = array.astype(np.object_)
        if array.dtype not in _NP_TO_TRITON:
            raise TritonModelException(f"unsupported numpy dtype {array.dtype}")
        self._name, self._array, self._torch = name, array, None

    @staticmethod
    def from_dlpack(name: str, tensor) -> Tensor:
        if name == "":
            raise TritonModelException("Tensor name cannot be an empty string.")
        capsule = type(tensor).__name__ == "PyCapsule"
        if not (capsule or hasattr(tensor, "__dlpack__")):
            raise TritonModelException(
                "Provided tensor is not supported. Tensor must be a DLPack capsule or have `__dlpack__` "
                "and `__dlpack_device__` attributes"
            )
        t = torch.from_dlpack(tensor)
        if t.dtype not in _TORCH_TO_TRITON:
            raise TritonModelException(f"unsupported DLPack dtype {t.dtype}")
        out = Tensor.__new__(Tensor)
        out._name, out._torch = name, t.clone()  # the stub copies into shared memory
        out._array = None if t.dtype == torch.bfloat16 else out._torch.numpy()
        return out

    def name(self) -> str:
        return self._name

    def triton_dtype_name(self) -> str:
        """Triton's datatype (stand-in helper for server.py; the real Tensor has triton_dtype())."""
        if self._torch is not None:
            return _TORCH_TO_TRITON[self._torch.dtype]
        return _NP_TO_TRITON[self._array.dtype]

    def as_numpy(self) -> np.ndarray:
        if self._array is None:
            raise TritonModelException(
                "Tensor dtype is BF16 and cannot be converted to NumPy. Use to_dlpack() and from_dlpack() instead."
            )
        return self._array

    def to_dlpack(self):
        t = self._torch if self._torch is not None else torch.from_numpy(self._array)
        return torch.utils.dlpack.to_dlpack(t)

    def is_cpu(self) -> bool:
        return True

    def shape(self) -> list[int]:
        return list(self._torch.shape if self._torch is not None else self._array.shape)


class InferenceResponse:
    def __init__(self, output_tensors=None, error: TritonError | None = None, parameters=None):
        self._tensors, self._error = list(output_tensors or []), error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InferenceResponseSender:
    """response_sender.cc: flags 0 or FINAL; a response with flags 0; one response when not decoupled."""

    def __init__(self, decoupled: bool):
        self.decoupled, self.sent, self.closed = decoupled, [], False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if flags not in (0, TRITONSERVER_RESPONSE_COMPLETE_FINAL):
            raise TritonModelException("Unable to send response. Unsupported flag provided.")
        if flags == 0 and response is None:
            raise TritonModelException(
                "Inference Response object must be provided when the response flags is set to zero."
            )
        if not self.decoupled and response is not None and self.sent:
            raise TritonModelException(
                "Unable to send response. Non-decoupled model cannot send more than one response."
            )
        if self.closed:
            raise TritonModelException("Unable to send response. Response sender has been closed.")
        self.closed = flags == TRITONSERVER_RESPONSE_COMPLETE_FINAL
        self.sent.append((response, flags))

    def is_cancelled(self) -> bool:
        return False


_ids = itertools.count(1)


class InferenceRequest:
    def __init__(
        self,
        request_id: str = "",
        correlation_id=0,
        *,
        inputs,
        requested_output_names,
        model_name: str,
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        preferred_memory=None,
        trace=None,
        parameters=None,
    ):
        self._request_id, self._inputs = request_id, list(inputs)
        self._requested = list(requested_output_names)
        self.model_name, self._sender = model_name, None

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def requested_output_names(self) -> list[str]:
        return self._requested

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            raise TritonModelException("a BLS request has no response sender")
        return self._sender

    def exec(self, decoupled: bool = False):
        """BLS: a response, or an iterator of responses when decoupled (pb_stub.cc 1836-1852)."""
        from tests.triton_python_standin import server

        return server.SERVER.exec(self, decoupled)


def get_input_tensor_by_name(inference_request, name):
    for tensor in inference_request.inputs():
        if tensor.name() == name:
            return tensor
    return None


def get_output_tensor_by_name(inference_response, name):
    for tensor in inference_response.output_tensors():
        if tensor.name() == name:
            return tensor
    return None


def using_decoupled_model_transaction_policy(model_config):
    if "model_transaction_policy" in model_config:
        return model_config["model_transaction_policy"]["decoupled"]
    return False


class Logger:
    @staticmethod
    def log_info(message: str) -> None:
        pass

    log_warn = log_error = log_verbose = log_info
