"""bench/serve_bench.py on the CPU: its metrics on made-up streams, its client (``run_load``) over
the three streaming routes of a server this test starts, and ``--tiny`` end to end (the bench
builds the tiny W1-shaped folder, starts and stops the server, writes its JSON)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tiny_vlm
from server_harness import REPO, ServerProcess, running, server_env

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serve_bench import ROUTES, RequestRecord, RunResult, Workload, build_payloads, run_load, summarize  # noqa: E402

OUTPUT_LEN = 8


def _stream(start: float, times: list[float], tokens: int) -> RequestRecord:
    return RequestRecord(start=start, end=times[-1], times=times, tokens=tokens, multi=0)


def test_summarize_burstiness_and_counts() -> None:
    # Ten chunks evenly over the lifetime -> one in the last 10%; all chunks at the end -> 1.0.
    even = [_stream(0.0, [0.1 * (i + 1) - 0.05 for i in range(10)], 10) for _ in range(3)]
    late = [_stream(0.0, [1.0] * 10, 10)]
    s = summarize(RunResult(even, [0.5], [1.0]), expected_tokens=10)
    assert s["burst_frac_p50"] == pytest.approx(0.1)
    assert s["itl_ms"]["p50"] == pytest.approx(100.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(50.0)
    assert s["out_tokens"] == 30 and s["short_requests"] == 0 and s["client_cpu"] == 0.5
    assert summarize(RunResult(late, [0.0], [1.0]))["burst_frac_p50"] == 1.0
    bad = RequestRecord(start=0.0, error="HTTP 400: nope")
    s = summarize(RunResult([*even, bad], [0.1], [1.0]), expected_tokens=12)
    assert s["errors"] == 1 and s["error_samples"] == ["HTTP 400: nope"] and s["short_requests"] == 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("serve_bench_vl"))
    log = tmp_path_factory.mktemp("serve_bench_log") / "server.log"
    args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", "1024", "--cpu-kv-cache-space", "0.25"]
    srv = ServerProcess(model_dir, log, "tiny-vl", args, server_env())
    with running(srv):
        yield srv


@pytest.mark.parametrize("route", ROUTES)
def test_run_load_counts_streamed_tokens(server, route: str) -> None:
    w = Workload(route=route, model="tiny-vl", output_len=OUTPUT_LEN, image_size=64)
    result = run_load(server.url, route, build_payloads(w, list(range(4))), 2, model="tiny-vl",
                      grpc_target=f"127.0.0.1:{server.grpc_port}", warmup=build_payloads(w, [99]))
    assert [r.error for r in result.records] == [None] * 4, server.tail()
    for r in result.records:
        assert r.tokens == OUTPUT_LEN  # the server's own count (usage / num_output_tokens)
        assert 1 <= len(r.times) <= OUTPUT_LEN and r.start < r.times[0] <= r.end
    s = summarize(result, OUTPUT_LEN)
    assert s["short_requests"] == 0 and s["out_tok_per_s"] > 0 and s["ttft_ms"]["p50"] > 0
    assert (s["multi_token_chunk_frac"] is None) == (route == "openai-chat")


def test_tiny_cli_end_to_end(tmp_path) -> None:
    out = tmp_path / "serve_bench.json"
    proc = subprocess.run([sys.executable, "bench/serve_bench.py", "--tiny", "--client-procs", "2", "--out", str(out)],
                          cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert {"device", "commit", "date", "runs"} <= doc.keys() and doc["device"]
    runs = doc["runs"]
    assert [(r["route"], r["concurrency"]) for r in runs] == [(rt, c) for rt in ROUTES for c in (1, 8)]
    for r in runs:
        assert r["server"] == "vlmserve" and r["requests"] == 16 and r["errors"] == 0, r["error_samples"]
        assert r["tokens_per_request"] == {"min": 16, "max": 16} and r["short_requests"] == 0
        assert r["out_tok_per_s"] > 0 and r["req_per_s"] > 0
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert set(r[key]) == {"p50", "p90", "p99"} and all(v is not None for v in r[key].values())
        assert 0 < r["burst_frac_p50"] <= 1 and 0 <= r["client_cpu"]
        assert r["client_procs"] == (1 if r["concurrency"] == 1 else 2)
    table = proc.stdout.splitlines()  # the printed table: a header, a rule, one line per run
    assert "tok/s" in table[0] and len([ln for ln in table if ln.startswith("vlmserve ")]) == len(runs)
