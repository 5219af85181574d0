#!/usr/bin/env bash
# One GPU lease of issue 14's measurements, in stages (each stage fits one device call):
#
#   bash bench/serve_gpu.sh model      build W1's Qwen2-VL-2B-shaped folder in /tmp/w1 (random bf16)
#   bash bench/serve_gpu.sh offline    offline W1: the first run after LLM() returns, then warm ones
#   bash bench/serve_gpu.sh vlmserve   `vlmserve serve` on /tmp/w1; serve_bench over its routes
#                                      (API_SERVERS=N: --api-server-count N, default 1)
#   bash bench/serve_gpu.sh vllm       vLLM 0.24's OpenAI server on /tmp/w1 (installed from
#                                      /tmp/vw, see ../shared/peers/vllm.md); the same client
#
# Results: $OUT/serve.json (every run of both servers; bench/serve_bench.py --append) and
# $OUT/gpu_throughput.json; server logs under $OUT. Our server's Python packages (kserve and
# what it needs beyond the GPU image) are carried as wheels in .whl and installed in /tmp/ks.
# Never name a shell variable CC here: Triton compiles its launchers with $CC.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
W1=/tmp/w1
RESULTS=$OUT/serve.json
[ -f /tmp/serve.json ] && cp /tmp/serve.json "$RESULTS"  # runs of earlier stages of this lease

ours_env() {
    if [ -d .whl ] && [ ! -f /tmp/ks/.done ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ks .whl/*.whl \
            && touch /tmp/ks/.done
    fi
    export PYTHONPATH=$PWD:/tmp/ks
}

wait_ready() {  # URL PATH SECONDS
    for _ in $(seq "$3"); do curl -sf "$1$2" >/dev/null && return 0; sleep 1; done
    return 1
}

bench() {  # server-name url extra-args...: one serve_bench call per (route, concurrency, requests)
    local name=$1 url=$2; shift 2
    python3 bench/serve_bench.py --url "$url" "$@" --out "$RESULTS" --append --output-len 128 \
        --image-size 448 --image-format png --served-model-name w1 --server "$name" \
        ${SERVER_PID:+--server-pid "$SERVER_PID"} 2>&1 | tail -n 12
    cp "$RESULTS" /tmp/serve.json
}

case "${1:?stage}" in
model)
    ours_env
    python3 bench/serve_model.py "$W1" && ls -la "$W1" ;;
offline)
    ours_env
    timeout 560 python3 bench/gpu_throughput.py --model-dir "$W1" --skip-micro --hf-batch 0 --profile-steps 0 \
        --breakdown-requests 0 --ttft-repeats 5 --batch1-tokens 256 --out "$OUT/gpu_throughput.json" 2>&1 | tail -n 30 ;;
vlmserve)
    ours_env
    python3 -m runtime.serve "$W1" --host 127.0.0.1 --port 8000 --grpc-port 8081 --served-model-name w1 \
        --max-num-seqs 512 --max-model-len 4096 --api-server-count "${API_SERVERS:-1}" > "$OUT/vlmserve.log" 2>&1 &
    pid=$!
    t0=$(date +%s)
    wait_ready http://127.0.0.1:8000 /v2/health/ready 300 || { tail -n 40 "$OUT/vlmserve.log"; exit 1; }
    echo "vlmserve ready after $(( $(date +%s) - t0 )) s"
    export SERVER_PID=$pid  # serve_bench reports the CPU of the server's processes
    bench vlmserve http://127.0.0.1:8000 --grpc-target 127.0.0.1:8081 --routes openai-chat --concurrency 512 --num-requests 512
    bench vlmserve http://127.0.0.1:8000 --grpc-target 127.0.0.1:8081 --routes openai-chat,v2-stream,grpc-stream --concurrency 64 --num-requests 256
    bench vlmserve http://127.0.0.1:8000 --grpc-target 127.0.0.1:8081 --routes openai-chat --concurrency 1 --num-requests 16
    bench vlmserve http://127.0.0.1:8000 --grpc-target 127.0.0.1:8081 --routes v2-stream,grpc-stream --concurrency 512 --num-requests 512
    kill -INT $pid; wait $pid ;;
profile)  # where the server's time goes: py-spy (carried in .prof) on the API and core processes
    ours_env
    python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .prof/py_spy*.whl
    python3 -m runtime.serve "$W1" --host 127.0.0.1 --port 8000 --grpc-port 8081 --served-model-name w1 \
        --max-num-seqs 512 --max-model-len 4096 > "$OUT/vlmserve_profile.log" 2>&1 &
    pid=$!
    wait_ready http://127.0.0.1:8000 /v2/health/ready 300 || { tail -n 40 "$OUT/vlmserve_profile.log"; exit 1; }
    core=$(pgrep -f engine.core_process | head -n 1)
    for c in 64 512; do  # 384 / 1024 requests: ~9 / ~22 s; 8 s sampled from the 4th second on
        (sleep 4; /tmp/pyspy/bin/py-spy record -p $pid -r 200 -f raw --threads --nonblocking -d 8 \
            -o "$OUT/pyspy_api_$c.txt" > "$OUT/pyspy_api_$c.log" 2>&1) &
        p1=$!
        (sleep 4; /tmp/pyspy/bin/py-spy record -p "$core" -r 200 -f raw --threads --nonblocking -d 8 \
            -o "$OUT/pyspy_core_$c.txt" > "$OUT/pyspy_core_$c.log" 2>&1) &
        p2=$!
        bench vlmserve http://127.0.0.1:8000 --routes openai-chat --concurrency $c --num-requests $(( c == 64 ? 384 : 1024 ))
        wait $p1 $p2
    done
    kill -INT $pid; wait $pid ;;
vllm)
    if [ ! -d /tmp/site/vllm ]; then
        (cd /tmp/vw && cat part_a part_b part_c part_d part_e > "$(cat wheel.name)" \
            && echo "$(cat wheel.sha)  $(cat wheel.name)" | sha256sum -c -) || exit 1
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/vw/"$(cat /tmp/vw/wheel.name)" \
            /tmp/vw/deps/*.whl /tmp/vw/xg/*.whl || exit 1
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site3 /tmp/vw/srv/*.whl || exit 1
    fi
    (export PYTHONPATH=/tmp/site:/tmp/site3 VLLM_USE_FLASHINFER_SAMPLER=0
     exec python3 -m vllm.entrypoints.openai.api_server --model "$W1" --served-model-name w1 --host 127.0.0.1 \
        --port 8001 --max-num-seqs 512 --max-model-len 4096 --limit-mm-per-prompt '{"image": 1}' \
        > "$OUT/vllm.log" 2>&1) &
    pid=$!
    t0=$(date +%s)
    wait_ready http://127.0.0.1:8001 /health 400 || { tail -n 60 "$OUT/vllm.log"; exit 1; }
    echo "vllm ready after $(( $(date +%s) - t0 )) s"
    export SERVER_PID=$pid
    ours_env  # the client's packages (the bench imports none of vLLM's)
    bench vllm http://127.0.0.1:8001 --routes openai-chat --concurrency 512 --num-requests 512
    bench vllm http://127.0.0.1:8001 --routes openai-chat --concurrency 64 --num-requests 256
    bench vllm http://127.0.0.1:8001 --routes openai-chat --concurrency 1 --num-requests 16
    kill -INT $pid; wait $pid ;;
*) echo "unknown stage $1" >&2; exit 2 ;;
esac
