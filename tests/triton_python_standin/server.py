"""The server side of the stand-in: models that BLS `exec` reaches, each checked against its config.pbtxt.

Before a request reaches a model, Triton's core checks it against the model's configuration; the stand-in
applies the same rules (its own wording of the messages): every input and requested output must be declared,
with the declared datatype (TYPE_STRING travels as BYTES) and shape (after the batch dimension, -1 matching any
size), and every non-optional input must be present. A decoupled model answers exec(decoupled=False) with an
error, as python_backend does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tests.triton_python_standin import triton_python_backend_utils as pb


@dataclass
class StandinModel:
    config: model_config_pb2.ModelConfig
    handler: Callable[[pb.InferenceRequest], Iterable[pb.InferenceResponse]]  # the responses of one request
    received: list[pb.InferenceRequest] = field(default_factory=list)

    @property
    def decoupled(self) -> bool:
        return self.config.model_transaction_policy.decoupled


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def config_json(config: model_config_pb2.ModelConfig) -> str:
    """args['model_config'] as Triton gives it to initialize(): JSON with every field, defaults included."""
    return json_format.MessageToJson(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def check_request(config: model_config_pb2.ModelConfig, request: pb.InferenceRequest) -> str | None:
    """Why Triton would refuse `request` for this model, or None."""
    inputs = {i.name: i for i in config.input}
    for tensor in request.inputs():
        spec = inputs.get(tensor.name())
        if spec is None:
            return f"unexpected inference input '{tensor.name()}' for model '{config.name}'"
        want = model_config_pb2.DataType.Name(spec.data_type).removeprefix("TYPE_").replace("STRING", "BYTES")
        if tensor.triton_dtype_name() != want:
            return f"input '{tensor.name()}' is {tensor.triton_dtype_name()}, model '{config.name}' expects {want}"
        shape = tensor.shape()[1:] if config.max_batch_size > 0 else tensor.shape()
        dims = list(spec.dims)
        if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape, strict=True)):
            return f"input '{tensor.name()}' has shape {tensor.shape()}, model '{config.name}' expects {dims}"
    given = {t.name() for t in request.inputs()}
    missing = [n for n, i in inputs.items() if not i.optional and n not in given]
    if missing:
        return f"model '{config.name}' expects input(s) {missing}"
    outputs = {o.name for o in config.output}
    for name in request.requested_output_names():
        if name not in outputs:
            return f"unexpected inference output '{name}' for model '{config.name}'"
    return None


class Server:
    def __init__(self):
        self.models: dict[str, StandinModel] = {}

    def add(self, config: model_config_pb2.ModelConfig, handler) -> StandinModel:
        self.models[config.name] = model = StandinModel(config, handler)
        return model

    def exec(self, request: pb.InferenceRequest, decoupled: bool):
        model = self.models.get(request.model_name)
        why = (
            f"Request for unknown model: '{request.model_name}' is not found"
            if model is None
            else check_request(model.config, request)
        )
        if why is None and model.decoupled and not decoupled:
            why = f"model '{request.model_name}' is decoupled: use exec(decoupled=True)"
        if why is not None:
            error = pb.InferenceResponse(error=pb.TritonError(why, pb.TritonError.INVALID_ARG))
            return iter([error]) if decoupled else error
        model.received.append(request)
        responses = list(model.handler(request))
        return iter(responses) if decoupled else responses[-1]


SERVER = Server()


def client_request(
    config: model_config_pb2.ModelConfig, inputs: list[pb.Tensor], outputs=()
) -> pb.InferenceRequest:
    """A request as a Triton client's reaches a Python model: checked first, with its response sender."""
    request = pb.InferenceRequest(inputs=inputs, requested_output_names=list(outputs), model_name=config.name)
    why = check_request(config, request)
    if why:
        raise ValueError(why)
    request._sender = pb.InferenceResponseSender(config.model_transaction_policy.decoupled)
    return request


def model_args(config: model_config_pb2.ModelConfig, repo: Path) -> dict[str, str]:
    """initialize()'s args (python_backend: model_config JSON, repository, version, name)."""
    return {
        "model_config": config_json(config),
        "model_repository": str(repo / config.name),
        "model_version": "1",
        "model_name": config.name,
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
    }
