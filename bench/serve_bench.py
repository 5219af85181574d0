"""Serving benchmark (issue 14, "Serve at engine speed"): a server on a model folder, driven over
its streaming routes by an async client that is not the bottleneck.

The bench starts ``python -m runtime.serve MODEL`` (``--server vlmserve``) or vLLM's OpenAI server
(``--server vllm``) with ``--server-args`` passed through, waits until it is ready, runs every
route x concurrency, and stops it (SIGTERM, then SIGKILL of its process group); or it attaches to
a running server (``--url``, ``--grpc-target``). Routes:

* ``openai-chat``: streamed /v1/chat/completions with ``stream_options.include_usage``;
* ``v2-stream``: POST /v2/models/{name}/generate_stream (SSE), ``{"text_input", "image":
  [base64...], "parameters": {sampling}}``;
* ``grpc-stream``: Triton's ModelStreamInfer, one bidirectional stream per request, inputs
  text_input, image (raw encoded bytes), stream, sampling_parameters (JSON) in raw_input_contents.

Every request carries distinct seeded random-noise images and is forced to ``--output-len``
tokens (max_tokens = min_tokens, ignore_eos, temperature 0). Request bodies are fully encoded
(bytes) before the clock starts; above 64 concurrent streams the load is split over client
processes (``--client-procs``), each with its own event loop, and their CPU use is reported.
Images as http URLs (``--image-source http``, a local file server) apply to openai-chat only:
the v2 protocol carries image bytes.

    python bench/serve_bench.py --tiny                       # CPU check: tiny model, all routes
    # one GPU session, both servers in one file (vLLM: openai-chat only)
    python bench/serve_bench.py --build-w1-model /tmp/w1 --concurrency 1,64,512 --out bench/results/serve_h200.json
    python bench/serve_bench.py --server vllm --model /tmp/w1 --concurrency 1,64,512 \
        --server-args "--max-num-seqs 256" --append --out bench/results/serve_h200.json

``run_load(url, route, payloads, concurrency, ...) -> RunResult`` and ``summarize(result)`` are
the importable client (tests/test_serve_bench.py drives a server it starts itself with them).
Note: ``--image-source http`` serves from 127.0.0.1, so with ``--url`` the server must be local
and opened to loopback image URLs (vlmserve: ``--allow-private-media-urls``; a server the bench
starts gets ``VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS=1``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

try:  # the client parses every chunk: orjson is several times faster than json
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads

ROUTES = ("openai-chat", "v2-stream", "grpc-stream")
GRPC_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
now = time.perf_counter  # CLOCK_MONOTONIC on Linux: comparable across the client processes


def log(msg: str) -> None:
    print(f"[serve_bench] {msg}", file=sys.stderr, flush=True)


# -- payloads ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What one run sends; ``build_payload(w, seed)`` makes one request body from it."""

    route: str
    model: str
    prompt: str = "Describe this image."
    output_len: int = 128
    num_images: int = 1
    image_size: int = 448
    image_format: str = "png"
    image_source: str = "data"  # http: openai-chat gets URLs of files in image_dir
    image_dir: str = ""
    image_url_base: str = ""

    def sampling(self) -> dict[str, Any]:
        n = self.output_len
        return {"max_tokens": n, "min_tokens": n, "ignore_eos": True, "temperature": 0}


def encode_image(seed: int, size: int, fmt: str) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90) if fmt == "jpeg" else img.save(buf, format="PNG")
    return buf.getvalue()


def _bytes_tensor(items: list[bytes]) -> bytes:  # KServe v2 raw BYTES: 4-byte LE length + bytes
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def build_payload(w: Workload, seed: int) -> bytes:
    """The request body of one request (JSON, or a serialized ModelInferRequest for gRPC)."""
    images = [encode_image(seed * 16 + k, w.image_size, w.image_format) for k in range(w.num_images)]
    mime = "image/jpeg" if w.image_format == "jpeg" else "image/png"
    if w.route == "openai-chat":
        parts: list[dict[str, Any]] = []
        for k, img in enumerate(images):
            if w.image_source == "http":
                name = f"img_{seed}_{k}.{w.image_format}"
                Path(w.image_dir, name).write_bytes(img)
                url = f"{w.image_url_base}/{name}"
            else:
                url = f"data:{mime};base64,{base64.b64encode(img).decode()}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        parts.append({"type": "text", "text": w.prompt})
        body = {"model": w.model, "messages": [{"role": "user", "content": parts}], "stream": True,
                "stream_options": {"include_usage": True}, **w.sampling()}
        return json.dumps(body).encode()
    if w.route == "v2-stream":
        body = {"id": f"r{seed}", "text_input": w.prompt, "parameters": w.sampling()}
        if images:
            body["image"] = [base64.b64encode(img).decode() for img in images]
        return json.dumps(body).encode()
    if w.route == "grpc-stream":
        from runtime import v2_grpc_predict_pb2 as pb

        req = pb.ModelInferRequest(model_name=w.model, id=f"r{seed}")
        tensors = [("text_input", "BYTES", [1], _bytes_tensor([w.prompt.encode()]))]
        if images:
            tensors.append(("image", "BYTES", [len(images)], _bytes_tensor(images)))
        tensors += [("stream", "BOOL", [1], b"\x01"),
                    ("sampling_parameters", "BYTES", [1], _bytes_tensor([json.dumps(w.sampling()).encode()]))]
        for name, dtype, shape, raw in tensors:
            req.inputs.add(name=name, datatype=dtype, shape=shape)
            req.raw_input_contents.append(raw)
        return req.SerializeToString()
    raise ValueError(f"unknown route {w.route!r}")


def build_payloads(w: Workload, seeds: list[int]) -> list[bytes]:
    return [build_payload(w, s) for s in seeds]


# -- client ------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One request: ``times`` are the arrival times of its content chunks (perf_counter)."""

    start: float = 0.0
    end: float = 0.0
    times: list[float] = field(default_factory=list)
    tokens: int = 0  # output tokens as the server counted them (usage / num_output_tokens)
    multi: int | None = None  # chunks that carried more than one token (None: not known)
    error: str | None = None


@dataclass
class RunResult:
    records: list[RequestRecord]
    cpu_s: list[float]  # per client process: CPU seconds during the timed part
    wall_s: list[float]  # per client process: wall seconds of the timed part


def _sse_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete ``data:`` payloads in ``buf`` and the unfinished rest."""
    out = []
    while (i := buf.find(b"\n\n")) >= 0:
        event, buf = buf[:i], buf[i + 2:]
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
    return out, buf


async def _http_stream(session: Any, url: str, body: bytes, route: str) -> RequestRecord:
    rec = RequestRecord(start=now())
    chat = route == "openai-chat"
    usage = None
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            buf = b""
            async for data in resp.content.iter_any():
                t = now()
                buf = (buf + data).replace(b"\r\n", b"\n") if b"\r" in data else buf + data
                events, buf = _sse_events(buf)
                for ev in events:
                    if ev == b"[DONE]":
                        continue
                    obj = _loads(ev)
                    if "error" in obj:
                        rec.error = f"stream error: {str(obj['error'])[:300]}"
                        continue
                    if chat:
                        if obj.get("usage"):
                            usage = obj["usage"].get("completion_tokens")
                        for ch in obj.get("choices") or ():
                            if (ch.get("delta") or {}).get("content"):
                                rec.times.append(t)
                                break
                    else:
                        n = int(obj.get("num_output_tokens") or 0)
                        if n > 0 or obj.get("text_output"):
                            rec.times.append(t)
                            rec.tokens += n
                            rec.multi = (rec.multi or 0) + (n > 1)
                rec.end = t
    except Exception as exc:  # noqa: BLE001 (recorded per request)
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    if chat:
        rec.tokens = usage if usage is not None else len(rec.times)
    return rec


async def _grpc_stream(method: Any, body: bytes) -> RequestRecord:
    rec = RequestRecord(start=now(), multi=0)
    try:
        call = method()
        await call.write(body)
        await call.done_writing()
        async for resp in call:
            t = now()
            if resp.error_message:
                rec.error = f"stream error: {resp.error_message[:300]}"
                continue
            r = resp.infer_response
            n = 0
            for i, o in enumerate(r.outputs):
                if o.name == "num_output_tokens":
                    n = int.from_bytes(r.raw_output_contents[i][:4], "little", signed=True)
            if n > 0:
                rec.times.append(t)
                rec.tokens += n
                rec.multi += n > 1
            rec.end = t
    except Exception as exc:  # noqa: BLE001
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    return rec


async def run_load_async(url: str, route: str, payloads: list[bytes], concurrency: int, *, model: str = "",
                         grpc_target: str = "", warmup: list[bytes] = (), timeout: float = 600.0,
                         barrier: Any = None) -> RunResult:
    """Send ``payloads`` with ``concurrency`` streams in flight (closed loop: each stream sends the
    next request when its previous one ends), after the ``warmup`` bodies; ``barrier`` (a
    multiprocessing.Barrier) lines up the timed start of several client processes."""
    import aiohttp
    import grpc

    closers = []
    if route == "grpc-stream":
        from runtime import v2_grpc_predict_pb2 as pb

        opts = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
                ("grpc.use_local_subchannel_pool", 1), ("grpc.enable_http_proxy", 0)]
        # One HTTP/2 connection per 64 streams; bodies are already serialized (no serializer).
        channels = [grpc.aio.insecure_channel(grpc_target, options=opts) for _ in range(max(1, -(-concurrency // 64)))]
        methods = [c.stream_stream(GRPC_METHOD, response_deserializer=pb.ModelStreamInferResponse.FromString)
                   for c in channels]
        closers = [c.close for c in channels]
        send = [partial(_grpc_stream, m) for m in methods]
    else:
        path = "/v1/chat/completions" if route == "openai-chat" else f"/v2/models/{model}/generate_stream"
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(concurrency, 1)),
                                        timeout=aiohttp.ClientTimeout(total=timeout))
        closers = [session.close]
        send = [lambda body: _http_stream(session, url.rstrip("/") + path, body, route)]

    async def drive(bodies: list[bytes], n_streams: int) -> list[RequestRecord]:
        records: list[RequestRecord | None] = [None] * len(bodies)
        todo = iter(enumerate(bodies))  # shared: each stream takes the next request

        async def stream(k: int) -> None:
            for i, body in todo:
                records[i] = await send[k % len(send)](body)

        await asyncio.gather(*(stream(k) for k in range(min(n_streams, len(bodies)))))
        return records  # type: ignore[return-value]

    try:
        if warmup:
            await drive(list(warmup), min(concurrency, len(warmup)))
        if barrier is not None:
            barrier.wait(timeout)
        cpu0, t0 = time.process_time(), now()
        records = await drive(payloads, concurrency)
        wall, cpu = now() - t0, time.process_time() - cpu0
    finally:
        for close in closers:
            await close()
    return RunResult(records, [cpu], [wall])


def run_load(url: str, route: str, payloads: list[bytes], concurrency: int, **kw: Any) -> RunResult:
    """``run_load_async`` in this process (its own event loop)."""
    return asyncio.run(run_load_async(url, route, payloads, concurrency, **kw))


def _worker(url: str, w: Workload, seeds: list[int], warm: list[int], concurrency: int, kw: dict,
            barrier: Any, queue: Any) -> None:
    try:
        result = run_load(url, w.route, build_payloads(w, seeds), concurrency, warmup=build_payloads(w, warm),
                          barrier=barrier, **kw)
        queue.put(("ok", result))
    except BaseException as exc:  # noqa: BLE001 (reported to the parent)
        barrier.abort()
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_load_procs(url: str, w: Workload, seeds: list[int], warm: list[int], concurrency: int, procs: int,
                   **kw: Any) -> RunResult:
    """Split requests and concurrency over ``procs`` client processes (each builds its own bodies
    before the common start); one process runs here in-process."""
    procs = max(1, min(procs, concurrency, len(seeds)))
    if procs == 1:
        return run_load(url, w.route, build_payloads(w, seeds), concurrency, warmup=build_payloads(w, warm),
                        model=w.model, **kw)
    ctx = mp.get_context("spawn")  # no fork of a process that holds grpc / event-loop state
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    workers = []
    for k in range(procs):
        share = concurrency // procs + (k < concurrency % procs)
        p = ctx.Process(target=_worker, args=(url, w, seeds[k::procs], warm[k::procs] or warm[:1], share,
                                               {"model": w.model, **kw}, barrier, queue), daemon=True)
        p.start()
        workers.append(p)
    merged = RunResult([], [], [])
    try:
        for _ in workers:
            while True:  # a run may take long; a client process that died must not hang the bench
                try:
                    status, res = queue.get(timeout=5)
                    break
                except queue_mod.Empty:
                    if not any(p.is_alive() for p in workers) and queue.empty():
                        raise RuntimeError("a client process exited without a result") from None
            if status != "ok":
                raise RuntimeError(f"client process failed: {res}")
            merged.records += res.records
            merged.cpu_s += res.cpu_s
            merged.wall_s += res.wall_s
    finally:
        for p in workers:
            p.join(10)
            if p.is_alive():
                p.kill()
    return merged


# -- metrics -----------------------------------------------------------------------------------
def _pct(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p = np.percentile(np.asarray(values) * scale, [50, 90, 99])
    return {"p50": round(float(p[0]), 3), "p90": round(float(p[1]), 3), "p99": round(float(p[2]), 3)}


def summarize(result: RunResult, expected_tokens: int | None = None) -> dict[str, Any]:
    """Run metrics: throughput over the span from the first request sent to the last chunk."""
    recs = result.records
    ok = [r for r in recs if r.error is None]
    errors = [r.error for r in recs if r.error is not None]
    begin = min(r.start for r in recs)
    end = max(max(r.end, r.start) for r in recs)
    duration = max(end - begin, 1e-9)
    tokens = sum(r.tokens for r in ok)
    gaps = [b - a for r in ok for a, b in zip(r.times, r.times[1:])]
    bursts = []
    for r in ok:
        life = r.times[-1] - r.start if r.times else 0.0
        if life > 0:
            cut = r.start + 0.9 * life
            bursts.append(sum(t > cut for t in r.times) / len(r.times))
    known = [r for r in ok if r.multi is not None]
    n_chunks = sum(len(r.times) for r in known)
    per_req = [r.tokens for r in ok]
    return {
        "requests": len(recs), "ok": len(ok), "errors": len(errors), "error_samples": errors[:3],
        "duration_s": round(duration, 3), "out_tokens": tokens,
        "out_tok_per_s": round(tokens / duration, 1), "req_per_s": round(len(ok) / duration, 3),
        "ttft_ms": _pct([r.times[0] - r.start for r in ok if r.times]),
        "itl_ms": _pct(gaps), "e2e_ms": _pct([r.end - r.start for r in ok]),
        "burst_frac_p50": round(float(np.median(bursts)), 3) if bursts else None,
        "multi_token_chunk_frac": round(sum(r.multi for r in known) / n_chunks, 4) if known and n_chunks else None,
        "chunks_per_request_p50": float(np.median([len(r.times) for r in ok])) if ok else None,
        "tokens_per_request": {"min": min(per_req), "max": max(per_req)} if per_req else None,
        "short_requests": sum(t != expected_tokens for t in per_req) if expected_tokens else None,
        "client_procs": len(result.cpu_s),
        "client_cpu": round(max(c / max(w, 1e-9) for c, w in zip(result.cpu_s, result.wall_s)), 3),
        "client_cpu_per_proc": [round(c / max(w, 1e-9), 3) for c, w in zip(result.cpu_s, result.wall_s)],
    }


# -- servers -----------------------------------------------------------------------------------
def _urlopen(url: str, timeout: float) -> Any:
    """urlopen without $http_proxy: the bench only talks to its own machine (or --url)."""
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess in its own session (so that stopping it reaches its children)."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.cmd, self.log_path = cmd, log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        log(f"starting: {shlex.join(cmd)} (log: {log_path})")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def wait_ready(self, url: str, paths: list[str], timeout: float) -> float:
        t0 = time.monotonic()
        pending = list(paths)
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.tail()}")
            try:
                with _urlopen(url + pending[0], timeout=5) as r:
                    if r.status == 200:
                        pending.pop(0)
                        continue
            except OSError:
                pass
            time.sleep(0.5)
        return time.monotonic() - t0

    def stop(self, grace: float = 40.0) -> None:
        pgid = self.proc.pid  # the session (and process group) this bench started
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log("server did not stop after SIGTERM; killing its process group")
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):  # what is left of the group
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.1)
        self.proc.wait(10)
        self.log.close()


def tree_cpu(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of process ``root`` and all its descendants, by pid, with
    each one's name (``comm``: vlmserve names its processes vlmserve-api and vlmserve-core; the
    engine core runs in a session of its own, so the tree, not the session, finds it)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # from the 3rd field (state) on
        procs[int(entry.name)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tick)
    found: dict[int, tuple[str, float]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in found:
            found[pid] = procs[pid][1:]
            todo += [child for child, (ppid, _, _) in procs.items() if ppid == pid]
    return found


def server_cpu(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall_s: float,
               requests: int, out_tokens: int) -> dict[str, dict[str, float]]:
    """Per process name: the cores it kept busy over the timed part, and its CPU milliseconds per
    request and per output token — what decides how many requests one front-end process can carry."""
    by_name: dict[str, list[float]] = {}
    for pid, (name, cpu) in after.items():
        used = cpu - before.get(pid, (name, 0.0))[1]
        by_name.setdefault(name, []).append(used)
    return {name: {"procs": len(used), "cores": round(sum(used) / max(wall_s, 1e-9), 3),
                   "cores_max_proc": round(max(used) / max(wall_s, 1e-9), 3),
                   "ms_per_request": round(1e3 * sum(used) / max(requests, 1), 3),
                   "us_per_out_token": round(1e6 * sum(used) / max(out_tokens, 1), 2)}
            for name, used in sorted(by_name.items())}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def server_command(kind: str, model_dir: str, name: str, port: int, grpc_port: int, extra: list[str]) -> list[str]:
    if kind == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *extra]
    return [sys.executable, "-m", "runtime.serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--grpc-port", str(grpc_port), "--served-model-name", name, *extra]


class ImageServer:
    """A threaded file server on 127.0.0.1 for ``--image-source http``."""

    def __init__(self, directory: str) -> None:
        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=directory))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- output ------------------------------------------------------------------------------------
def device_name() -> str:
    """The GPU's name from nvidia-smi (no CUDA context in this process: the server needs the
    memory), else the CPU model."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def print_table(runs: list[dict]) -> None:
    def f(x: Any, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)

    head = (f"{'server':9} {'route':12} {'conc':>5} {'reqs':>5} {'err':>4} {'dur s':>7} {'tok/s':>9} {'req/s':>7} "
            f"{'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>16} {'E2E p50/p99 ms':>17} {'burst':>5} {'multi':>5} {'cpu':>5}")
    print(head)
    print("-" * len(head))
    for r in runs:
        t, i, e = r["ttft_ms"], r["itl_ms"], r["e2e_ms"]
        print(f"{r['server']:9} {r['route']:12} {r['concurrency']:>5} {r['requests']:>5} {r['errors']:>4} "
              f"{r['duration_s']:>7.2f} {r['out_tok_per_s']:>9.1f} {r['req_per_s']:>7.2f} "
              f"{f(t['p50']):>8}/{f(t['p99']):<8} {f(i['p50'], '.2f'):>7}/{f(i['p99'], '.2f'):<8} "
              f"{f(e['p50'], '.0f'):>8}/{f(e['p99'], '.0f'):<8} {f(r['burst_frac_p50'], '.2f'):>5} "
              f"{f(r['multi_token_chunk_frac'], '.2f'):>5} {f(r['client_cpu'], '.2f'):>5}")
    for r in runs:
        if r["error_samples"]:
            print(f"errors in {r['server']} {r['route']} c={r['concurrency']}: {r['error_samples']}")


def write_json(path: Path, runs: list[dict], append: bool) -> None:
    doc: dict[str, Any] = {"benchmark": "serve_bench", "device": device_name(), "commit": git_commit(),
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "runs": []}
    if append and path.is_file():
        doc = json.loads(path.read_text())
    doc["runs"] = doc.get("runs", []) + runs
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {path} ({len(doc['runs'])} runs)")


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", choices=("vlmserve", "vllm"), default="vlmserve")
    p.add_argument("--model", default=None, help="model folder to serve")
    p.add_argument("--build-w1-model", type=Path, default=None, metavar="DIR",
                   help="build W1's Qwen2-VL-2B-shaped folder (bench/serve_model.py) in DIR first; serves it")
    p.add_argument("--server-args", default="", help="extra server flags, one shell-quoted string")
    p.add_argument("--served-model-name", default=None, help="default: from --server-args, else 'vlm-bench'")
    p.add_argument("--url", default=None, help="attach to a running server (http://host:port) instead")
    p.add_argument("--grpc-target", default=None, help="host:port of its gRPC server (with --url)")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--server-log", type=Path, default=None)
    p.add_argument("--routes", default=None, help=f"comma list of {', '.join(ROUTES)} (default: all the server has)")
    p.add_argument("--concurrency", default="1,64,512", help="comma list: one run per value")
    p.add_argument("--num-requests", type=int, default=0, help="per run (default: max(32, 4 x concurrency))")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompt-text", default="Describe this image.")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--image-format", choices=("png", "jpeg"), default="png")
    p.add_argument("--image-source", choices=("data", "http"), default="data")
    p.add_argument("--warmup", type=int, default=4, help="untimed requests before each run")
    p.add_argument("--client-procs", type=int, default=0, help="default: 1 up to concurrency 64, else up to 4")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/serve_bench_<device>.json")
    p.add_argument("--append", action="store_true", help="add the runs to an existing --out file")
    p.add_argument("--server-pid", type=int, default=None,
                   help="with --url: the server's process, whose CPU (and its children's) each run reports")
    p.add_argument("--tiny", action="store_true",
                   help="CPU check: tiny Qwen2-VL in a temp folder, 16 requests, concurrency 1,8, 16 tokens")
    args = p.parse_args(argv)
    if args.tiny:  # the CPU check's defaults, unless given
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, value in (("--concurrency", "1,8"), ("--num-requests", 16), ("--output-len", 16),
                            ("--image-size", 112), ("--warmup", 2)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
        args.server_args = ("--device cpu --dtype float32 --max-num-seqs 16 --cpu-kv-cache-space 0.25 "
                            + args.server_args)
    return args


def _served_name(args: argparse.Namespace, extra: list[str]) -> tuple[str, list[str]]:
    """The model name requests use, and ``extra`` without its --served-model-name (the bench
    passes the name itself)."""
    names: list[str] = []
    if "--served-model-name" in extra:
        i = extra.index("--served-model-name")
        j = i + 1
        while j < len(extra) and not extra[j].startswith("--"):
            j += 1
        names, extra = extra[i + 1:j], extra[:i] + extra[j:]
    if args.served_model_name or names:
        return args.served_model_name or names[0], extra
    if args.url:  # ask the running server
        with _urlopen(args.url.rstrip("/") + "/v1/models", timeout=10) as r:
            return json.loads(r.read())["data"][0]["id"], extra
    return "vlm-bench", extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    routes = args.routes.split(",") if args.routes else (["openai-chat"] if args.server == "vllm" else list(ROUTES))
    if bad := [r for r in routes if r not in ROUTES or (args.server == "vllm" and r != "openai-chat")]:
        raise SystemExit(f"unsupported route(s) for {args.server}: {bad}")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="serve_bench_")
    model_dir = args.model
    if args.build_w1_model or args.tiny:
        from bench.serve_model import build_w1_model, check_processor

        target = args.build_w1_model or Path(tmp.name) / "model"
        t0 = time.monotonic()
        # In a child process: building on CUDA would leave a CUDA context in this one.
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=build_w1_model, args=(target, args.tiny))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"building the model folder failed (exit code {p.exitcode})")
        log(f"model folder {target} ready in {time.monotonic() - t0:.1f} s; processor: {check_processor(target)}")
        model_dir = model_dir or str(target)
    name, extra = _served_name(args, shlex.split(args.server_args))

    server = None
    url, grpc_target = args.url, args.grpc_target
    image_server = None
    runs: list[dict] = []
    try:
        if url is None:
            if model_dir is None:
                raise SystemExit("--model DIR (or --build-w1-model DIR, --tiny, or --url) is required")
            port, grpc_port = free_port(), free_port()
            url, grpc_target = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
            # The server fetches --image-source http images from this machine: never via a proxy,
            # and from a loopback address, which vlmserve refuses unless told.
            for key in ("NO_PROXY", "no_proxy"):
                env[key] = ",".join(filter(None, [env.get(key), "127.0.0.1", "localhost"]))
            if args.image_source == "http":
                env["VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS"] = "1"
            log_path = args.server_log or Path(tmp.name) / "server.log"
            server = ServerProcess(server_command(args.server, str(model_dir), name, port, grpc_port, extra),
                                   log_path, env)
            paths = ["/health", "/v1/models"] if args.server == "vllm" else ["/v2/health/ready"]
            log(f"server ready after {server.wait_ready(url, paths, args.ready_timeout):.1f} s")
        if "grpc-stream" in routes and not grpc_target:
            raise SystemExit("the grpc-stream route needs --grpc-target host:port with --url")
        image_dir = Path(tmp.name) / "images"
        image_dir.mkdir()
        if args.image_source == "http":
            image_server = ImageServer(str(image_dir))
        run_no = 0
        for route in routes:
            source = args.image_source if route == "openai-chat" else "data"
            w = Workload(route=route, model=name, prompt=args.prompt_text, output_len=args.output_len,
                         num_images=args.num_images, image_size=args.image_size, image_format=args.image_format,
                         image_source=source, image_dir=str(image_dir),
                         image_url_base=image_server.url if image_server else "")
            for conc in concurrencies:
                run_no += 1
                n = args.num_requests or max(32, 4 * conc)
                procs = args.client_procs or (1 if conc <= 64 else min(4, os.cpu_count() or 1))
                base = args.seed * 10_000_000 + run_no * 100_000  # distinct images in every run
                seeds, warm = [base + i for i in range(n)], [base + 90_000 + i for i in range(args.warmup)]
                log(f"{args.server} {route} concurrency {conc}: {n} requests, {procs} client process(es)")
                server_pid = server.proc.pid if server else args.server_pid
                cpu0 = tree_cpu(server_pid) if server_pid else {}
                result = run_load_procs(url, w, seeds, warm, conc, procs, grpc_target=grpc_target or "",
                                        timeout=args.request_timeout)
                cpu1 = tree_cpu(server_pid) if server_pid else {}
                for f in image_dir.iterdir():
                    f.unlink()
                run = {"server": args.server, "route": route, "concurrency": conc,
                       **summarize(result, args.output_len),
                       "output_len": args.output_len, "num_images": args.num_images, "image_size": args.image_size,
                       "image_format": args.image_format, "image_source": source, "warmup": args.warmup,
                       "server_args": args.server_args, "commit": git_commit(),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                if server_pid:  # the warm-up requests are inside this window too: counted as requests
                    run["server_cpu"] = server_cpu(cpu0, cpu1, max(result.wall_s), run["requests"] + len(warm),
                                                   run["out_tokens"] + len(warm) * args.output_len)
                    log("  server CPU: " + ", ".join(f"{name} x{v['procs']}: {v['cores']} cores, "
                                                     f"{v['ms_per_request']} ms/request"
                                                     for name, v in run["server_cpu"].items()))
                runs.append(run)
                log(f"  {run['out_tok_per_s']:.1f} out tok/s, {run['errors']} errors, "
                    f"TTFT p50 {run['ttft_ms']['p50']} ms, client cpu {run['client_cpu']}")
    finally:
        if image_server:
            image_server.close()
        if server:
            server.stop()
            log("server stopped")
        if runs:
            print_table(runs)
            out = args.out
            if out is None:
                dev = device_name()
                short = "tiny_cpu" if args.tiny else next((k.lower() for k in ("H200", "H100", "A100") if k in dev),
                                                          "gpu" if "nvidia" in dev.lower() else "cpu")
                out = REPO_ROOT / "bench" / "results" / f"serve_bench_{short}.json"
            write_json(out, runs, args.append)
        tmp.cleanup()
    return 0 if runs and all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    # Run as bench.serve_bench (not __main__) so that spawned client processes and the objects
    # they send back resolve to the same module.
    from bench.serve_bench import main as _main

    sys.exit(_main())
