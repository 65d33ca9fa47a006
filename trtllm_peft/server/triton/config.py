"""A v2 model's configuration as Triton's ModelConfig message (model_config.proto, from tritonclient[grpc]).

gRPC ModelConfig returns the message; HTTP GET /v2/models/{name}/config its JSON with the proto field
names, as Triton's HTTP server does. Platform / backend, max_batch_size, inputs and outputs (dims without
the batch dimension) and the decoupled transaction policy are this server's; no instance groups or
scheduling are claimed.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from trtllm_peft.server.triton.models import MAX_BATCH, V2Model


def _data_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def model_config(model: V2Model) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=model.name, max_batch_size=MAX_BATCH)
    if model.platform == "ensemble":
        cfg.platform = "ensemble"
    else:
        cfg.backend = model.platform
    for io in model.inputs:
        cfg.input.add(
            name=io.name, data_type=_data_type(io.datatype), dims=list(io.dims), optional=io.optional
        )
    for io in model.outputs:
        cfg.output.add(name=io.name, data_type=_data_type(io.datatype), dims=list(io.dims))
    cfg.model_transaction_policy.decoupled = model.decoupled
    return cfg


def model_config_json(model: V2Model) -> dict[str, Any]:
    return json_format.MessageToDict(model_config(model), preserving_proto_field_name=True)
