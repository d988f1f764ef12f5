#!/usr/bin/env bash
# Prepared runs for a lent GPU (issue: GPU fast path); each part is one device call, its timeouts adding up to
# at most 560 s, under the device's 600 s per command. Run from the repository root:
#
#   bash scripts/gpu_session.sh            # part 1, about 6-8 minutes on an H200:
#       1. the static path's tests and the greedy tests on CUDA, graphs on (they are the default there);
#       2. each method's host work per step beside its graphs (scripts/host_ops.py, a tiny-width 28-layer model);
#       3. step costs eager vs static/graphs per row bucket, capture times and tokens/s (scripts/gpu_profile.py);
#       4. the speculative methods projected from the CPU traces and those costs (scripts/project_gpu.py).
#   bash scripts/gpu_session.sh compiled   # part 2, about 3-7 minutes, if device time is left: the steps compiled
#       by torch.compile (fused kernels), then captured: their tests on CUDA, then step costs, compile times and
#       tokens/s of the 1.5B and the 0.5B draft beside hf-greedy (scripts/gpu_profile.py --kinds compiled; hf-static,
#       whose own compile takes time, is in part 1's run).
#
# Results under $OUT, else runs/gpu-session.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-runs/gpu-session}"
part="${1:-main}"
mkdir -p "$out"
# the speculative methods projected from the CPU's step traces (1.5B target) and the costs just measured for
# target $3 (a second, no GPU work; the 7B's projection borrows the 1.5B's acceptance)
project() {
    timeout 10 python3 scripts/project_gpu.py project --costs "$1" --kind "$2" --target "$3" --traces \
        docs/bench/cpu-traces-qwen-coder-1.5b-as-cuda.json docs/bench/cpu-traces-qwen-coder-1.5b-draft-trees.json \
        docs/bench/cpu-traces-qwen-coder-1.5b-lookahead-windows.json 2>&1 | tee "$out/projection-$2-$3.md"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
if [ "$part" = compiled ]; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider --device cuda tests/test_static.py -k compile \
        2>&1 | tail -30 | tee "$out/pytest-cuda-compiled.txt"
    timeout 300 python3 scripts/gpu_profile.py --device cuda --dtype bfloat16 --targets 1.5b --kinds compiled \
        --no-hf-static --out "$out/gpu-profile-compiled.json" 2>&1 | tail -60 > "$out/gpu-profile-compiled.log"
    tail -30 "$out/gpu-profile-compiled.log"
    project "$out/gpu-profile-compiled.json" compiled 1.5b
    exit 0
fi
timeout 200 python3 -m pytest -q -p no:cacheprovider --device cuda tests/test_static.py tests/test_greedy.py \
    tests/test_prefix_cache.py -k "not compile" 2>&1 | tail -40 | tee "$out/pytest-cuda.txt"
timeout 60 python3 scripts/host_ops.py --device cuda --repeats 3 2>&1 | grep '^{' | tee "$out/host-ops-cuda.jsonl"
timeout 280 python3 scripts/gpu_profile.py --device cuda --dtype bfloat16 --targets 1.5b,7b \
    --out "$out/gpu-profile.json" 2>&1 | tail -60 > "$out/gpu-profile.log"
tail -30 "$out/gpu-profile.log"
project "$out/gpu-profile.json" static 1.5b
project "$out/gpu-profile.json" static 7b
