#!/usr/bin/env bash
# Serve an engine with NVIDIA's Triton + tensorrtllm_backend, configured from NIM's variables:
#   1. `trtllm-peft triton-repo` writes the model repository: PEFT cache sized from NIM_MAX_GPU_LORAS /
#      NIM_MAX_CPU_LORAS, adapters of NIM_PEFT_SOURCE prefetched under numeric task ids (map in lora_tasks.json);
#   2. tritonserver starts under mpirun, one rank per GPU, as tensorrtllm_backend's launch_triton_server.py
#      does (that script backgrounds the server and exits; a container needs it in the foreground).
# Environment: TRTLLM_PEFT_ENGINE_DIR, NIM_PEFT_SOURCE, NIM_MAX_GPU_LORAS, NIM_MAX_CPU_LORAS,
#   WORLD_SIZE (1; the engine's tensor-parallel size), TRITON_REPO (/models), GPU_FREE_GIB (GPU memory free after
#   the engine, buffers and decoder; default: the free memory now less an estimate of those),
#   TRITON_HTTP_PORT (8000), TRITON_GRPC_PORT (8001), TRITON_METRICS_PORT (8002).
set -euo pipefail
repo="${TRITON_REPO:-/models}"
world="${WORLD_SIZE:-1}"
gen=(triton-repo --engine "${TRTLLM_PEFT_ENGINE_DIR}" --out "${repo}")
if [[ -n "${GPU_FREE_GIB:-}" ]]; then
    gen+=(--gpu-free-gib "${GPU_FREE_GIB}")
fi
trtllm-peft "${gen[@]}"

cmd=(mpirun --allow-run-as-root)
for ((rank = 0; rank < world; rank++)); do
    if ((rank > 0)); then
        cmd+=(:)
    fi
    cmd+=(-n 1 /opt/tritonserver/bin/tritonserver "--model-repository=${repo}"
        "--http-port=${TRITON_HTTP_PORT:-8000}" "--grpc-port=${TRITON_GRPC_PORT:-8001}"
        "--metrics-port=${TRITON_METRICS_PORT:-8002}" --disable-auto-complete-config
        "--backend-config=python,shm-region-prefix-name=prefix${rank}_")
    if ((rank > 0)); then  # ranks other than 0 only run their share of the engine; rank 0 serves
        cmd+=(--model-control-mode=explicit --load-model=tensorrt_llm)
    fi
done
exec "${cmd[@]}"
