"""The API process's CPU per streamed output token, and per request, on the CPU.

    python -m bench.stream_cost --label before --out bench/results/stream_cost_cpu.json --append

starts a vlmserve server on the tiny Qwen2-VL whose engine core is ``bench/fake_core.py`` (one
token per running request every ``--step-ms``: the API process, not the tiny model, is the
bottleneck, as on the GPU), then drives text-only streams of two output lengths over each route
with ``bench/serve_bench.py`` and reads the ``vlmserve-api`` process's CPU time. The per-request
cost cancels in the difference of the two lengths::

    us_per_token_marginal = (cpu(long) - cpu(short)) / (tokens(long) - tokens(short))

``--real-core`` serves the tiny model instead (slow: a few hundred tokens/s here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def _serve_with_fake_core(argv: list[str]) -> int:
    """``runtime.serve`` whose AsyncLLM launches ``bench.fake_core`` as its core process."""
    import engine.core_process as core_process

    real_start = core_process.start_core_process

    def start(engine_args: Any, timeout: float) -> Any:
        real_popen = subprocess.Popen

        def popen(cmd: list[str], **kw: Any) -> subprocess.Popen:
            return real_popen(["bench.fake_core" if c == "engine.core_process" else c for c in cmd], **kw)

        subprocess.Popen = popen  # type: ignore[misc]  (only while the core starts)
        try:
            return real_start(engine_args, timeout)
        finally:
            subprocess.Popen = real_popen  # type: ignore[misc]

    import engine.async_llm

    engine.async_llm.start_core_process = start
    from runtime.serve import main

    return main(argv)


def _api_cpu(run: dict) -> tuple[float, int]:
    """(API process CPU seconds, output tokens incl. warm-up) of one serve_bench run."""
    cpu = run["server_cpu"]["vlmserve-api"]
    tokens = run["out_tokens"] + run["warmup"] * run["output_len"]
    return cpu["us_per_out_token"] * tokens / 1e6, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="e.g. before / after: stored with each run")
    p.add_argument("--routes", default="openai-chat,v2-stream,grpc-stream")
    p.add_argument("--lengths", default="64,512", help="two output lengths")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=5.0, help="the fake core's step period")
    p.add_argument("--real-core", action="store_true", help="serve the tiny model itself")
    p.add_argument("--model", default=None, help="a tiny model folder (default: build one)")
    p.add_argument("--out", default=None)
    p.add_argument("--append", action="store_true")
    args = p.parse_args(argv)

    from bench import serve_bench as sb

    tmp = tempfile.TemporaryDirectory(prefix="stream_cost_")
    model = args.model
    if model is None:  # built in a child, as serve_bench does, so this process stays small
        model = str(Path(tmp.name) / "model")
        subprocess.run([sys.executable, "-c", f"from bench.serve_model import build_w1_model; "
                        f"build_w1_model({model!r}, True)"], cwd=REPO_ROOT, check=True, capture_output=True)
    port, grpc_port = sb.free_port(), sb.free_port()
    url = f"http://127.0.0.1:{port}"
    head = [sys.executable, "-m", "runtime.serve"] if args.real_core else [sys.executable, "-m", "bench.stream_cost",
                                                                          "--serve-fake-core"]
    cmd = head + [model, "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port),
                  "--served-model-name", "vlm-bench", "--device", "cpu", "--dtype", "float32",
                  "--cpu-kv-cache-space", "0.25", "--max-num-seqs", str(max(args.concurrency, 16))]
    env = dict(os.environ, FAKE_CORE_STEP_S=str(args.step_ms / 1000))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    server = sb.ServerProcess(cmd, Path(tmp.name) / "server.log", env)
    results: list[dict] = []
    try:
        sb.log(f"server ready after {server.wait_ready(url, ['/v2/health/ready'], 300):.1f} s")
        short, long_ = (int(x) for x in args.lengths.split(","))
        for route in args.routes.split(","):
            runs = {}
            for length in (short, long_):
                out = Path(tmp.name) / f"{route}_{length}.json"
                sb.main(["--url", url, "--grpc-target", f"127.0.0.1:{grpc_port}", "--server-pid",
                         str(server.proc.pid), "--routes", route, "--concurrency", str(args.concurrency),
                         "--num-requests", str(args.num_requests), "--num-images", "0",
                         "--output-len", str(length), "--warmup", "2", "--out", str(out)])
                runs[length] = json.loads(out.read_text())["runs"][0]
            (c_s, t_s), (c_l, t_l) = _api_cpu(runs[short]), _api_cpu(runs[long_])
            n = runs[short]["requests"] + runs[short]["warmup"]
            result = {
                "label": args.label, "route": route, "concurrency": args.concurrency, "requests": n,
                "core": "real" if args.real_core else f"fake {args.step_ms} ms/step",
                "us_per_token_marginal": round(1e6 * (c_l - c_s) / (t_l - t_s), 2),
                "ms_per_request_fixed": round(1e3 * (c_s - t_s * (c_l - c_s) / (t_l - t_s)) / n, 3),
                **{f"api_us_per_token_{k}": runs[k]["server_cpu"]["vlmserve-api"]["us_per_out_token"]
                   for k in (short, long_)},
                **{f"api_cores_{k}": runs[k]["server_cpu"]["vlmserve-api"]["cores"] for k in (short, long_)},
                **{f"out_tok_per_s_{k}": runs[k]["out_tok_per_s"] for k in (short, long_)},
                "errors": sum(runs[k]["errors"] for k in (short, long_)),
                "commit": sb.git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            sb.log(f"{args.label} {route}: {result['us_per_token_marginal']} us/token marginal, "
                   f"{result['ms_per_request_fixed']} ms/request fixed "
                   f"(all-in {result[f'api_us_per_token_{short}']} / {result[f'api_us_per_token_{long_}']} us/token)")
            results.append(result)
    finally:
        server.stop()
        tmp.cleanup()
    if args.out:
        path = Path(args.out)
        data = json.loads(path.read_text()) if args.append and path.exists() else {"runs": []}
        data["runs"].extend(results)
        path.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-fake-core"]:
        sys.exit(_serve_with_fake_core(sys.argv[2:]))
    from bench.stream_cost import main as _main

    sys.exit(_main())
