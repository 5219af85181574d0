"""``--api-server-count 3``: three API server processes share the engine core and the ports.

The real server (``python -m runtime``) on the tiny Qwen2; each process answers ``/metrics`` with
its own ``vlmserve:api_server_info{pid}``, which tells them apart from outside, and with every
process's request counters summed. Requests spread
over all must give the same greedy text as one process would (the engine is the same), each
process must have served some, gRPC must work on the shared port, and SIGTERM to the head must
stop every process with exit code 0.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil
import pytest
from server_harness import ServerProcess, running, server_env

COUNT = 3  # two copies warm up at the same moment: their warm-up request ids must differ
PROMPTS = ["Hello there", "The quick brown fox", "a b c d", "Once upon a time"]
PROCESS = re.compile(r'^vlmserve:api_server_info\{pid="(\d+)"\} 1\.0$', re.MULTILINE)
SUCCESS = re.compile(r'^vllm:request_success_total\{[^}]*finished_reason="length"[^}]*\} (\S+)$', re.MULTILINE)


class Server(ServerProcess):
    def __init__(self, model_dir, log_path) -> None:
        args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", "256", "--api-server-count", str(COUNT),
                "--graceful_shutdown_timeout", "10"]
        super().__init__(model_dir, log_path, "tiny", args, server_env())


@pytest.fixture(scope="module")
def server(tiny_qwen2, tmp_path_factory):
    with running(Server(tiny_qwen2, tmp_path_factory.mktemp("api_servers") / "server.log")) as srv:
        yield srv


def scrape(url: str) -> tuple[str, float]:
    """(which process answered, its count of finished requests) from one fresh connection."""
    text = httpx.get(f"{url}/metrics", timeout=10, headers={"Connection": "close"}).text
    success = SUCCESS.search(text)
    return PROCESS.search(text).group(1), float(success.group(1)) if success else 0.0


def complete(url: str, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "min_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60, headers={"Connection": "close"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_api_servers_share_the_engine_and_the_port(server):
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 90
    while len(seen) < COUNT and time.monotonic() < deadline:  # the copies start once the engine is up
        who, _ = scrape(server.url)
        seen[who] = 0.0
        time.sleep(0.2)
    assert len(seen) == COUNT, f"only {len(seen)} process answered /metrics:\n{server.tail()}"
    # Both must be ready to serve before the load: readiness is per process.
    deadline = time.monotonic() + 90
    ready = 0
    while ready < 20 and time.monotonic() < deadline:
        ready = ready + 1 if httpx.get(f"{server.url}/v2/health/ready", timeout=5,
                                       headers={"Connection": "close"}).status_code == 200 else 0
    reference = {p: complete(server.url, p) for p in PROMPTS}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda i: (PROMPTS[i % 4], complete(server.url, PROMPTS[i % 4])), range(48)))
    assert all(text == reference[prompt] for prompt, text in texts)

    # Whichever process answers, /metrics counts every process's requests (Prometheus would read
    # per-process counters as one counter jumping up and down).
    per_process: dict[str, float] = defaultdict(float)
    for _ in range(60):
        who, done = scrape(server.url)
        per_process[who] = done
    assert len(per_process) == COUNT, dict(per_process)
    warmups = COUNT  # each process warms up with one request of its own before it serves
    assert set(per_process.values()) == {len(PROMPTS) + 48 + warmups}, dict(per_process)

    # gRPC on the shared port, through whichever process answers
    import grpc

    from runtime import v2_grpc_predict_pb2 as pb, v2_grpc_predict_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        live = pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
    assert live.live


def test_sigterm_to_the_head_stops_every_process(tiny_qwen2, tmp_path_factory):
    srv = Server(tiny_qwen2, tmp_path_factory.mktemp("api_servers_stop") / "server.log")
    try:
        srv.wait_ready()
        head = psutil.Process(srv.proc.pid)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            copies = [c for c in head.children() if "engine.core_process" not in " ".join(c.cmdline())]
            if len(copies) == COUNT - 1 and len({scrape(srv.url)[0] for _ in range(20)}) == COUNT:
                break
            time.sleep(0.5)
        everyone = [head, *head.children(recursive=True)]
        assert len(everyone) >= COUNT + 1, [p.cmdline() for p in everyone]  # the processes and the engine core
        # The processes' shared metrics (the head made the directory; its copies were started with it).
        metrics_dir = Path(copies[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, srv.tail()
        assert not metrics_dir.exists()
        gone, alive = psutil.wait_procs(everyone, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        srv.stop()
