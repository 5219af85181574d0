#!/usr/bin/env bash
# One device call (see /work/.library/device): the GPU-only tests, then bench/gpu_throughput.py.
# Writes logs and JSON under $OUT (or /tmp/gpu_check). Usage: bash scripts/gpu_check.sh [bench args...]
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
TESTS=${GPU_TESTS:-"tests/test_fused_kernels.py tests/test_gpu_engine.py tests/test_async_scheduling.py tests/test_qwen2_vl_pixels.py"}
if [ -n "$TESTS" ] && [ "$TESTS" != none ]; then
  timeout "${GPU_TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -x -s $TESTS 2>&1 | tail -60 | tee "$OUT/tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-420}" python3 bench/gpu_throughput.py --out "$OUT/gpu_throughput.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^|" | tail -40
fi
