"""Client-chosen LoRA task ids (Triton's in-band LoRA) on the host cache: TensorRT-LLM's rules, our id space."""

from __future__ import annotations

import pytest
import torch

from trtllm_peft.executor.api import NOT_CACHED_MESSAGE
from trtllm_peft.lora import LoraAdapter, LoraWeights, pack
from trtllm_peft.server.triton.lora_tasks import CLIENT_TASK_BASE, ClientLoraTasks, LoraTaskError
from trtllm_peft.serving.catalog import Catalog
from trtllm_peft.serving.host_cache import HostCache, HostCacheFullError


def tensors(spec, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, N, W] weights and [1, N, 4] config of a rank-`rank` adapter on every module and layer of `spec`."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(spec.num_layers):
        for module in spec.lora_target_modules:
            d_in, d_out = spec.module_dims(module)
            a, b = torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)
            weights[(layer, module)] = LoraWeights(a=a, b=b)
    packed = pack(LoraAdapter(weights=weights, format="trtllm"), spec.dtype)
    return packed.weights[None], packed.config[None]


def first_module(config: torch.Tensor, module_id: int) -> torch.Tensor:
    """The config with its first row's module id replaced."""
    out = config.clone()
    out[0, 0, 0] = module_id
    return out


@pytest.fixture
def spec(tiny_spec):
    return tiny_spec.with_limits(max_lora_rank=8, lora_target_modules=("attn_q", "attn_k", "attn_v"))


def test_first_request_loads_then_id_alone_hits(spec):
    cache = HostCache(spec.cache_units(4))
    tasks = ClientLoraTasks(spec, cache)
    w, c = tensors(spec, 4, seed=1)
    first = tasks.lease(7, w, c)
    assert first.task_id >= CLIENT_TASK_BASE  # never an id the catalog hands out
    assert torch.equal(first.packed.weights, w[0]) and first.packed.config.shape[1] == 4
    cache.release(first.task_id)
    again = tasks.lease(7)
    assert again.task_id == first.task_id and torch.equal(again.packed.weights, w[0])
    cache.release(again.task_id)
    other_w, other_c = tensors(spec, 4, seed=2)
    ignored = tasks.lease(7, other_w, other_c)  # TensorRT-LLM: weights for a held task are ignored
    assert torch.equal(ignored.packed.weights, w[0])
    cache.release(ignored.task_id)
    assert len(tasks) == 1


def test_unknown_id_gets_tensorrt_llm_text(spec):
    tasks = ClientLoraTasks(spec, HostCache(spec.cache_units(2)))
    with pytest.raises(LoraTaskError) as e:
        tasks.lease(123)
    assert str(e.value) == NOT_CACHED_MESSAGE.format(task_id=123) and e.value.http_status == 400


def test_evicted_task_is_forgotten_and_reloads_under_a_fresh_id(spec):
    cache = HostCache(spec.cache_units(1))  # room for one max-rank adapter
    tasks = ClientLoraTasks(spec, cache)
    w1, c1 = tensors(spec, 8, seed=1)
    first = tasks.lease(1, w1, c1)
    cache.release(first.task_id)
    second = tasks.lease(2, *tensors(spec, 8, seed=2))  # evicts task 1 (idle)
    cache.release(second.task_id)
    with pytest.raises(LoraTaskError, match="LoRA task 1 not found in cache"):
        tasks.lease(1)
    reloaded = tasks.lease(1, w1, c1)
    assert reloaded.task_id not in (first.task_id, second.task_id)  # new content could never reuse the old id
    with pytest.raises(HostCacheFullError):  # the only room is leased by task 1
        tasks.lease(3, *tensors(spec, 8, seed=3))


def test_client_ids_do_not_meet_catalog_ids(spec, tmp_path):
    catalog = Catalog(tmp_path, first_task_id=1)
    catalog.scan()
    tasks = ClientLoraTasks(spec, HostCache(spec.cache_units(2)))
    lease = tasks.lease(1, *tensors(spec, 2, seed=1))  # the same number the catalog gives its first adapter
    assert lease.task_id != 1 and lease.name == "triton_lora_task"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w, c: (w.half(), c), "Expected lora weights to be the same data type as base model"),
        (lambda w, c: (w, None), "must have both lora_weights and lora_keys"),
        (lambda w, c: (w[:, :, :5], c), "needs"),
        (lambda w, c: (w, c.float()), "lora_config must be int32"),
        (lambda w, c: (w, torch.cat([c, c], dim=1)), "lora_weights has"),
        (lambda w, c: (w, first_module(c, 42)), "module id 42 is not a module"),
        (lambda w, c: (w, first_module(c, 4)), r"attn_dense \(o_proj\) is not enabled in this engine"),
    ],
)
def test_bad_tensors_are_refused_with_the_reason(spec, change, message):
    cache = HostCache(spec.cache_units(2))
    tasks = ClientLoraTasks(spec, cache)
    w, c = change(*tensors(spec, 4, seed=1))
    with pytest.raises(LoraTaskError, match=message):
        tasks.lease(5, w, c)
    assert len(cache) == 0  # nothing half-loaded


def test_three_column_config_is_read(spec):
    w, c = tensors(spec, 4, seed=1)
    lease = ClientLoraTasks(spec, HostCache(spec.cache_units(2))).lease(9, w, c[:, :, :3].contiguous())
    assert lease.packed.config.tolist() == c[0].tolist()
