#!/usr/bin/env bash
# One device check, sized for a lent GPU's short budget (about 8 minutes on one H100): writes JSON under
# bench/results/ and prints each benchmark's table.
#   1. bench/layer.py at StarCoder 1B/3B/15B widths in bf16: FLoRA r=1 and r=8 (every path) vs the bmm LoRA and
#      PEFT's loop, decode and prefill shapes;
#   2. bench/serve.py on the native engine (FLoRA vs LoRA at the same ranks, every request its own adapter);
#   3. where vLLM imports (pip install "flora-hf[vllm]"), the same serving scenarios on flora-serve --engine vllm.
# Usage: bash bench/gpu_check.sh [MODEL_DIR]   (default: the tiny code model; give a 1B-class model folder for
# figures that mean something: the device machine has no network, so it must already be on disk)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${1:-}
OUT=bench/results
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== 1/3 layer: StarCoder widths, bf16"
timeout 200 "$PY" bench/layer.py --device cuda --dtype bfloat16 --ranks 1,8 --dims 2048,2816,6144 \
    --shapes decode=32x1,prefill=8x512 --budget-s 5 --out "$OUT" || echo "layer bench: exit $?"

MODEL_FLAG=()
if [ -n "$MODEL" ]; then MODEL_FLAG=(--model-id "$MODEL" --target-modules q_proj,k_proj,v_proj,o_proj); fi
SCEN=none,flora-r1-x32,flora-r8-x32,lora-r1-x32,lora-r8-x32
echo "== 2/3 serve: native engine"
timeout 170 "$PY" bench/serve.py --device cuda --dtype float16 "${MODEL_FLAG[@]}" --scenarios "$SCEN" \
    --rates 8,inf --num-requests 64 --repeats 1 --out "$OUT" || echo "serve bench (native): exit $?"

if "$PY" -c 'import vllm' 2>/dev/null; then
    echo "== 3/3 serve: vLLM engine"
    timeout 200 "$PY" bench/serve.py --device cuda --dtype float16 "${MODEL_FLAG[@]}" --engine vllm \
        --scenarios "$SCEN" --rates 8,inf --num-requests 64 --repeats 1 --out "$OUT/vllm" \
        || echo "serve bench (vllm): exit $?"
else
    echo "== 3/3 serve: vLLM engine skipped: vLLM does not import in $PY (pip install 'flora-hf[vllm]')"
fi
ls -l "$OUT"
