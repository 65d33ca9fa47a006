"""`TorchExecutor`: the reference engine behind the executor contract (api.py), on CPU or one CUDA GPU.

A background thread runs continuous batching (TensorRT-LLM's inflight batching). Each iteration it
  1. takes new requests: validates them and their LoRA (host tier of the PEFT cache: errors answer at once),
  2. admits waiting requests, in order, while the batch is under `max_batch_size`, the paged KV cache can
     promise every block the request may need (kv/blocks.py: GUARANTEED_NO_EVICT; a prefix already cached
     for the same LoRA task is reused when `KvCacheConfig.enable_block_reuse`), and the device tier can hold
     its adapter (else it waits — distinct adapters in the batch never exceed the device budget),
  3. runs one forward for the whole iteration (schedule.py): a token for every decoding sequence plus prompt
     chunks up to `max_num_tokens` (whole prompts unless `enable_chunked_context`), all adapters mixed,
     sampling where a prompt completes or a sequence decodes,
  4. sends streaming deltas and final results, and retires finished or cancelled requests (their blocks
     return to the pool; full ones stay reusable until evicted).
The caller's threads and the engine thread share only a `Mailbox` (mailbox.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from pathlib import Path

import torch

from trtllm_peft.engine.engine_dir import EngineDir
from trtllm_peft.engine.memory import (
    DEFAULT_TOKENS_PER_BLOCK,
    default_budget_bytes,
    peft_cache_config,
    plan_memory,
)
from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.executor.api import (
    DEVICE_CACHE_FULL_MESSAGE,
    FinishReason,
    GuidedDecodingConfig,
    IdType,
    IterationStats,
    KvCacheConfig,
    PeftCacheConfig,
    Request,
    Response,
)
from trtllm_peft.executor.guided import GuideCompiler, MaskBuffer
from trtllm_peft.executor.torch.batch_lora import BatchLora
from trtllm_peft.executor.torch.intake import accept, admit_lora
from trtllm_peft.executor.torch.kv import BlockManager, PagedKVCache, kv_cache_stats
from trtllm_peft.executor.torch.mailbox import Mailbox
from trtllm_peft.executor.torch.model import LlamaModel
from trtllm_peft.executor.torch.ops import ops_for
from trtllm_peft.executor.torch.peft_cache import PeftCache
from trtllm_peft.executor.torch.sampler import new_state
from trtllm_peft.executor.torch.schedule import attention_tokens, plan_iteration
from trtllm_peft.executor.torch.sequence import Sequence
from trtllm_peft.executor.torch.step import run_step

log = logging.getLogger(__name__)

# Prompt-chunk tokens per iteration while sequences decode, on CPU (schedule.py; bench/README.md "Paged KV
# cache": the streams' worst interval 0.18 s instead of a multi-second stall, the long prompt's TTFT longer).
CPU_CHUNK_TOKENS_WHILE_DECODING = 24  # 16 / 24 / 32: bench/README.md "Paged KV cache" (quiet sweep, 06:25)


def pick_device() -> torch.device:
    """CUDA when torch sees a GPU, else CPU: the same code runs on both."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class TorchExecutor:
    """The reference engine. `peft_cache_config` defaults to the one the engine was sized with.

    `max_batch_size`, `max_seq_len` and `max_num_tokens` may lower the engine's limits; `kv_cache_config`
    sizes the paged KV cache and turns block reuse on or off (TensorRT-LLM's KvCacheConfig, whose default
    enables reuse); `enable_chunked_context` is ExecutorConfig's flag of that name;
    `chunk_tokens_while_decoding` caps the prompt chunks while sequences decode (None: the device's default,
    0: only max_num_tokens). The memory plan is recomputed for this device and budget and logged.
    """

    greedy_logprobs_are_raw = True  # log-softmax of the raw logits (sampler.py): see serving/orchestrator.py

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        peft_cache_config: PeftCacheConfig | None = None,
        device: str | torch.device | None = None,
        max_batch_size: int | None = None,
        memory_budget_bytes: int | None = None,
        max_gpu_loras: int | None = None,
        max_cpu_loras: int | None = None,
        max_seq_len: int | None = None,
        max_num_tokens: int | None = None,
        kv_cache_config: KvCacheConfig | None = None,
        enable_chunked_context: bool = False,
        chunk_tokens_while_decoding: int | None = None,
        split_threads: bool = True,
        cpu_kernels: bool = True,
        guided_decoding_config: GuidedDecodingConfig | None = None,
    ) -> None:
        self.engine = EngineDir.open(engine_dir)
        self.spec, self.arch, self.dtype = self.engine.spec, self.engine.arch, self.engine.dtype
        self.device = torch.device(device) if device is not None else pick_device()
        self._limits(max_seq_len, max_num_tokens, max_batch_size)
        self.kv_cache_config = kv_cache_config or KvCacheConfig()
        self.chunked = enable_chunked_context
        self._chunk_budget(chunk_tokens_while_decoding)
        sized = self.engine.meta.get("sized_from", {})
        gpu_loras = max_gpu_loras or sized.get("NIM_MAX_GPU_LORAS", 8)
        cpu_loras = max_cpu_loras or sized.get("NIM_MAX_CPU_LORAS", 16)
        self.plan = self._plan(memory_budget_bytes, gpu_loras, cpu_loras)
        log.info("%s", self.plan.table())
        self.peft_cache_config = peft_cache_config or peft_cache_config_for(self.spec, gpu_loras, cpu_loras)
        pc = self.peft_cache_config
        self.cache = PeftCache(pc.num_host_module_layer, pc.num_device_module_layer)
        self.ops, planned = ops_for(self.device, self.dtype, cpu_kernels), self.plan.peft_device_bytes
        self.lora = BatchLora(self.cache, self.ops, self.spec, self.dtype, self.device, planned)
        log.info("reference engine: %s, %s, %s ops", self.device, self.dtype, self.ops.name)
        self.model = LlamaModel(
            self.arch, self.engine.load_weights(), self.dtype, self.device, self.max_seq_len, self.ops
        )
        a = self.arch
        self.kv = PagedKVCache(
            a.num_layers, self.plan.kv_num_blocks, self.tokens_per_block, a.num_kv_heads, a.head_dim,
            self.dtype, self.device,
        )  # fmt: skip
        reuse = self.kv_cache_config.enable_block_reuse
        self.blocks = BlockManager(self.plan.kv_num_blocks, self.tokens_per_block, enable_block_reuse=reuse)
        # guided decoding: only with a GuidedDecodingConfig, as in TensorRT-LLM
        guided = guided_decoding_config is not None
        self.guides = GuideCompiler(guided_decoding_config, a.vocab_size) if guided else None
        self._masks = MaskBuffer(a.vocab_size, self.max_batch_size) if guided else None
        self._ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self.mailbox = Mailbox()
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []  # admitted: prefilling or decoding, in admission order
        self._iter = 0
        self._threads = torch.get_num_threads() if split_threads else 0
        self._thread = threading.Thread(target=self._loop, name="trtllm-peft-engine", daemon=True)
        self._thread.start()

    def _limits(
        self, max_seq_len: int | None, max_num_tokens: int | None, max_batch_size: int | None
    ) -> None:
        """The engine's build limits, lowered where asked; tokens_per_block from its plugin_config."""
        bc = self.engine.build_config
        self.max_seq_len = min(int(bc["max_seq_len"]), max_seq_len or int(bc["max_seq_len"]))
        built_tokens = int(bc.get("max_num_tokens") or self.max_seq_len)
        self.max_num_tokens = min(built_tokens, max_num_tokens or built_tokens)
        self.max_batch_size = min(int(bc["max_batch_size"]), max_batch_size or int(bc["max_batch_size"]))
        tpb = bc.get("plugin_config", {}).get("tokens_per_block")
        self.tokens_per_block = int(tpb or DEFAULT_TOKENS_PER_BLOCK)

    def _chunk_budget(self, tokens: int | None) -> None:
        """Prompt-chunk tokens per iteration while sequences decode (schedule.py): None = this device's
        default (CPU: CPU_CHUNK_TOKENS_WHILE_DECODING; GPU: no limit), 0 = no limit."""
        if tokens is None:
            tokens = CPU_CHUNK_TOKENS_WHILE_DECODING if self.device.type == "cpu" else 0
        self.chunk_tokens_while_decoding = tokens or None
        a = self.arch
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        per_layer = a.hidden_size * (2 * q + 2 * kv) + 3 * a.hidden_size * a.intermediate_size
        self.attention_tokens = attention_tokens(per_layer, q)

    def _plan(self, budget_bytes, gpu_loras: int, cpu_loras: int):
        """The memory plan for this device and budget (the KV cache gets what the rest leaves)."""
        return plan_memory(
            self.spec,
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_seq_len,
            max_gpu_loras=gpu_loras,
            max_cpu_loras=cpu_loras,
            budget_bytes=budget_bytes or default_budget_bytes(self.device.type),
            host_in_budget=self.device.type == "cpu",
            tied_embeddings=self.arch.tie_word_embeddings,
            tokens_per_block=self.tokens_per_block,
            kv_cache_config=self.kv_cache_config,
        )

    # ---- caller side (any thread) ----------------------------------------------------------------------

    def enqueue_request(self, request: Request) -> IdType:
        return self.enqueue_requests([request])[0]

    def enqueue_requests(self, requests: list[Request]) -> list[IdType]:
        with self._ids_lock:
            ids = [next(self._ids) for _ in requests]
        seqs = [
            Sequence(
                id=rid,
                request=req,
                sampling=new_state(
                    req.sampling_config, req.end_id, self.device, req.embedding_bias, req.bad_words
                ),
                max_new=req.max_tokens,
            )
            for rid, req in zip(ids, requests, strict=True)
        ]
        self.mailbox.post([s for s in seqs if not self._compile_first(s)])
        return ids

    def _compile_first(self, seq: Sequence) -> bool:
        """Guided requests reach the engine thread once their grammar is compiled (on the compile worker)."""
        if seq.request.guided_decoding_params is None or self.guides is None:
            return False
        seq.guide_future = self.guides.submit(seq.request.guided_decoding_params)
        seq.guide_future.add_done_callback(lambda _: self._post_late(seq))
        return True

    def _post_late(self, seq: Sequence) -> None:
        with contextlib.suppress(TrtllmPeftError):  # shut down meanwhile: nobody waits for it
            self.mailbox.post([seq])

    def await_responses(self, id: IdType | None = None, timeout: float | None = None) -> list[Response]:
        """Responses ready (for all requests, or request `id`), waiting up to `timeout` s for the first one."""
        return self.mailbox.collect(id, timeout, self._thread.is_alive)

    def get_num_responses_ready(self, id: IdType | None = None) -> int:
        return self.mailbox.num_ready(id)

    def cancel_request(self, id: IdType) -> None:
        self.mailbox.cancel(id)

    def can_enqueue_requests(self) -> bool:
        return not self.mailbox.stopped

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        return self.mailbox.take_stats()

    def shutdown(self) -> None:
        self.mailbox.stop()
        self._thread.join()
        if self.guides is not None:
            self.guides.shutdown()

    def __enter__(self) -> TorchExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- engine thread ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self._threads > 1:
            self.ops.use_threads(self._threads)
        while (work := self.mailbox.take_work(busy=bool(self._waiting or self._running))) is not None:
            new, cancel = work
            try:
                self._iteration(new, cancel)
            except Exception as e:  # a bug must not hang every caller: fail what is in flight, keep serving
                log.exception("engine iteration failed")
                self._fail_all(f"internal engine error: {type(e).__name__}: {e}")

    def _iteration(self, new: list[Sequence], cancel: set[int]) -> None:
        t0 = time.perf_counter()
        out: list[Response] = []
        for seq in new:
            err = self._intake(seq)
            if err:
                out.append(Response(request_id=seq.id, error_msg=err, client_id=seq.request.client_id))
        done = self._cancel_seqs(cancel)
        n_done = self._emit(out, done)
        n_new = self._admit(out)
        n_ctx, n_gen = self._step() if self._running else (0, 0)
        n_done += self._emit(out, [])
        self._record(t0, n_ctx, n_gen, n_new, n_done)

    def _intake(self, seq: Sequence) -> str | None:
        """Validate a new request and hold its adapter in the host tier; an error text or None."""
        err = accept(seq, self.max_seq_len, self.arch.vocab_size, self.guides is not None)
        if err is None and seq.request.lora_config is not None:
            err = admit_lora(self.cache, seq.request.lora_config, self.spec, self.dtype)
            seq.task_id = None if err else seq.request.lora_config.task_id
        if err is None:
            self._waiting.append(seq)
        return err

    def _admit(self, out: list[Response]) -> int:
        """Move waiting requests into the batch, in order, while rows and KV blocks allow; how many."""
        admitted = 0
        for seq in list(self._waiting):
            full = seq.prompt_len + seq.max_new
            # context logits cover every prompt position: such a request reuses no cached blocks
            prefix = [] if seq.request.output_config.return_context_logits else seq.tokens
            if len(self._running) >= self.max_batch_size or not self.blocks.can_admit(
                seq.task_id, prefix, full
            ):
                break  # first come, first served: later requests do not overtake one that waits for blocks
            if seq.task_id is not None and not self._device_ready(seq, out):
                continue
            self._waiting.remove(seq)
            seq.cached = self.blocks.admit(seq.id, seq.task_id, prefix, full)
            self._running.append(seq)
            admitted += 1
        return admitted

    def _device_ready(self, seq: Sequence, out: list[Response]) -> bool:
        """Bring the request's adapter to the device tier; False = wait. An adapter that can never fit fails."""
        if not self.cache.device_fits_ever(seq.task_id):
            self._waiting.remove(seq)
            self.cache.finish(seq.task_id)
            out.append(
                Response(
                    request_id=seq.id, error_msg=DEVICE_CACHE_FULL_MESSAGE, client_id=seq.request.client_id
                )
            )
            return False
        return self.lora.to_device(seq.task_id)

    def _step(self) -> tuple[int, int]:
        """One forward: prompt chunks and one token per decoding sequence; (context tokens, decoded)."""
        chunks, decoding = plan_iteration(
            self._running,
            self.max_num_tokens,
            chunked=self.chunked,
            tokens_per_block=self.tokens_per_block,
            chunk_tokens_while_decoding=self.chunk_tokens_while_decoding,
            attention_tokens=self.attention_tokens,
        )
        lora, index = self.lora.of({s.task_id for s in self._running} - {None})
        run_step(self.model, self.kv, self.blocks, chunks, decoding, lora, index, self._masks)
        return sum(n for _, n in chunks), len(decoding)

    def _cancel_seqs(self, cancel: set[int]) -> list[Sequence]:
        """Mark cancelled requests finished; waiting ones leave now, running ones at the next _emit."""
        done = []
        for seq in [s for s in self._waiting + self._running if s.id in cancel]:
            seq.finish = FinishReason.CANCELLED
            if seq in self._waiting:
                self._waiting.remove(seq)
                if seq.task_id is not None:
                    self.cache.finish(seq.task_id)
                done.append(seq)
        if cancel:
            self.mailbox.cancelled(cancel)
        return done

    def _retire(self) -> list[Sequence]:
        """Remove finished sequences from the batch: their KV blocks and adapters are released."""
        gone = [s for s in self._running if s.finish != FinishReason.NOT_FINISHED]
        if gone:
            self._running = [s for s in self._running if s.finish == FinishReason.NOT_FINISHED]
        for seq in gone:
            self.blocks.release(seq.id)
            if seq.task_id is not None:
                self.cache.leave_device(seq.task_id)
                self.cache.finish(seq.task_id)
        return gone

    def _emit(self, out: list[Response], done: list[Sequence]) -> int:
        """Send what is due (errors in `out`, deltas, finals), retire finished requests; returns how many."""
        out += [r for seq in self._running + done if (r := seq.response()) is not None]
        n_done = len(done) + len(self._retire())
        if out:
            self.mailbox.deliver(out)
            out.clear()
        return n_done

    def _record(self, t0: float, n_ctx: int, n_gen: int, n_new: int, n_done: int) -> None:
        self._iter += 1
        stats = IterationStats(  # the fields executor::IterationStats (types.h) has that this engine fills
            timestamp=time.strftime("%m-%d-%Y %H:%M:%S"),
            iter=self._iter,
            iter_latency_ms=(time.perf_counter() - t0) * 1e3,
            num_new_active_requests=n_new,
            num_active_requests=len(self._running),
            num_queued_requests=len(self._waiting),
            num_completed_requests=n_done,
            max_num_active_requests=self.max_batch_size,
            num_context_tokens=n_ctx,
            num_gen_tokens=n_gen,
            num_active_lora_tasks=len({s.task_id for s in self._running} - {None}),
            num_host_cached_lora_tasks=len(self.cache.host),
            num_device_cached_lora_tasks=len(self.cache.device),
            kv_cache_stats=kv_cache_stats(self.blocks),
        )
        self.mailbox.deliver([], stats)

    def _fail_all(self, message: str) -> None:
        """After an internal error: answer every request in flight with it and start from a clean state."""
        seqs = self._waiting + self._running
        self._waiting, self._running = [], []
        self.cache = PeftCache(self.cache.host.capacity, self.cache.device.capacity)
        self.lora = BatchLora(self.cache, self.ops, self.spec, self.dtype, self.device)
        self.blocks = BlockManager(
            self.blocks.num_blocks, self.tokens_per_block, enable_block_reuse=self.blocks.enable_block_reuse
        )
        self.mailbox.deliver(
            [Response(request_id=s.id, error_msg=message, client_id=s.request.client_id) for s in seqs]
        )


def peft_cache_config_for(spec, gpu_loras: int, cpu_loras: int) -> PeftCacheConfig:
    return peft_cache_config(
        spec, max_lora_rank=spec.max_lora_rank, max_gpu_loras=gpu_loras, max_cpu_loras=cpu_loras
    )
