"""Issue 13, "A load test in CI": the real server (``python -m runtime`` serving the tiny Qwen2-VL
on 127.0.0.1, CPU) under 64 concurrent clients, each sending 3 requests, over every generative
route at once:

* OpenAI chat (streamed and not) and completions (streamed and not);
* v2 REST generate, generate_stream and infer (JSON tensors);
* gRPC ModelStreamInfer and ModelInfer;
* a share of the prompts carry a PNG (a data URL for chat, a base64 / raw ``image`` tensor for v2);
* some streams are dropped by their client after 2 chunks (chat SSE, generate_stream SSE, a
  cancelled gRPC stream): the server must abort them;
* some non-streamed requests (chat, completions, v2 generate and infer, gRPC infer) are given up
  by their client after HANGUP_S, long before their DROP_MAX_TOKENS tokens: the server must abort
  them too;
* poison requests (``seed`` 2**64 with temperature 1, which once killed the engine core) on
  chat, v2 generate, v2 infer, gRPC infer and gRPC stream: each gets its own 400 /
  INVALID_ARGUMENT and nothing else is affected.

Every other request is greedy and forced to ``OUT`` tokens (max_tokens = min_tokens,
ignore_eos, temperature 0). Asserted, for a warm-up run of the mix and then the measured run:
0 lost requests (each completes with ``OUT`` tokens, finish_reason "length"), 0 5xx, each output
text and prompt token count identical to a sequential reference (concurrency 1) of the same
prompt, so also across routes (chat prompts are rendered with the model's chat template for the
completions and v2 routes, so every route sees the same prompt tokens); every dropped stream
counted as aborted, and no dropped or given-up request finishing on its own (the "length"
finishes are exactly the greedy requests); the running / waiting gauges and KV cache usage back
at 0; and the RSS of the server and its engine-core child after the measured run within 10% of
the RSS after the warm-up run.

The async clients reuse bench/serve_bench.py's SSE parser and raw BYTES tensor encoding.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import tiny_vlm
from prometheus_client.parser import text_string_to_metric_families
from server_harness import REPO, ServerProcess, running, server_env

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.serve_bench import GRPC_METHOD, _bytes_tensor, _sse_events  # noqa: E402

MODEL = "tiny-vl"
MAX_MODEL_LEN = 1024
CLIENTS = 64
PER_CLIENT = 3
OUT = 16  # forced output tokens of every greedy request
DROP_MAX_TOKENS = 400  # a dropped stream could not finish on its own before its client hangs up
DROP_AFTER = 2  # chunks a dropping client reads before it closes the stream
HANGUP_S = 0.5  # a giving-up client's wait for a non-streamed answer (DROP_MAX_TOKENS take longer)
NUM_TEXT, NUM_IMAGE = 8, 4  # distinct prompts
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"

KINDS = ("chat", "chat_stream", "completions", "completions_stream", "v2_generate", "v2_stream", "v2_infer",
         "grpc_stream", "grpc_infer")
DROP_KINDS = ("chat_stream", "v2_stream", "grpc_stream")
HANGUP_KINDS = ("chat", "completions", "v2_generate", "v2_infer", "grpc_infer")
POISON_KINDS = ("chat", "v2_generate", "v2_infer", "grpc_infer", "grpc_stream")
GREEDY = {"temperature": 0, "max_tokens": OUT, "min_tokens": OUT, "ignore_eos": True}
POISON = {"temperature": 1.0, "seed": 2**64, "max_tokens": OUT}


@dataclass
class Prompt:
    messages: list[dict[str, Any]]  # for chat
    text: str  # the chat template's rendering: for completions and v2
    image: bytes | None = None  # PNG


@dataclass
class Job:
    kind: str
    key: int  # the prompt
    mode: str = "greedy"  # greedy | drop | hangup | poison


@dataclass
class Result:
    job: Job
    status: int = 0  # HTTP status, or 200 / 400 / ... for gRPC (0: transport failure)
    text: str = ""
    tokens: int = 0
    prompt_tokens: int | None = None
    finish: str | None = None
    chunks: int = 0
    error: str | None = None

    def text_and_prompt(self) -> tuple[str, int | None]:
        return self.text, self.prompt_tokens


@dataclass
class Harness:
    url: str
    grpc_target: str
    prompts: list[Prompt]
    results: list[Result] = field(default_factory=list)


class Server(ServerProcess):
    def __init__(self, model_dir: Path, log_path: Path) -> None:
        args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", str(MAX_MODEL_LEN)]
        super().__init__(model_dir, log_path, MODEL, args, server_env())

    def metrics(self) -> dict[tuple[str, tuple], float]:
        r = httpx.get(f"{self.url}/metrics", timeout=10)
        assert r.status_code == 200
        out = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                if s.labels.get("model_name") == MODEL:
                    labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                    out[(s.name, labels)] = s.value
        return out

    def rss(self) -> int:
        """RSS of the server and all its children (the engine core), bytes."""
        proc = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def metric(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


# -- the mix --------------------------------------------------------------------------------------------
def make_prompts(model_dir: Path) -> list[Prompt]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for k in range(NUM_TEXT + NUM_IMAGE):
        words = f"Prompt {k}: tell me {'a story' if k % 2 else 'something'} about the number {k * 7 + 3}."
        if k < NUM_TEXT:
            messages = [{"role": "user", "content": words}]
            render, image = messages, None
        else:
            buf = io.BytesIO()
            tiny_vlm.random_image(56 + 28 * (k % 2), 84, seed=100 + k).save(buf, format="PNG")
            image = buf.getvalue()
            url = "data:image/png;base64," + base64.b64encode(image).decode()
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": words}]}]
            render = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}]
        text = tok.apply_chat_template(render, tokenize=False, add_generation_prompt=True)
        assert (image is not None) == ("<|image_pad|>" in text)
        prompts.append(Prompt(messages, text, image))
    return prompts


def make_jobs() -> list[Job]:
    """CLIENTS * PER_CLIENT jobs; client c sends jobs[c::CLIENTS] one after the other."""
    jobs = []
    n_prompts = NUM_TEXT + NUM_IMAGE
    drops = hangups = poisons = 0
    for i in range(CLIENTS * PER_CLIENT):
        kind = KINDS[i % len(KINDS)]
        key = (i + i // len(KINDS)) % n_prompts  # each prompt over every route
        if kind.startswith("completions"):
            key %= NUM_TEXT  # completions take no image
        if i % 16 == 5:
            jobs.append(Job(DROP_KINDS[drops % len(DROP_KINDS)], key, "drop"))
            drops += 1
        elif i % 16 == 13:
            kind = HANGUP_KINDS[hangups % len(HANGUP_KINDS)]
            jobs.append(Job(kind, key % NUM_TEXT if kind == "completions" else key, "hangup"))
            hangups += 1
        elif i % 37 == 12 and poisons < len(POISON_KINDS):
            jobs.append(Job(POISON_KINDS[poisons], key, "poison"))
            poisons += 1
        else:
            jobs.append(Job(kind, key))
    return jobs


# -- the clients ----------------------------------------------------------------------------------------
def _params(job: Job) -> dict[str, Any]:
    if job.mode == "poison":
        return dict(POISON)
    if job.mode in ("drop", "hangup"):
        return {**GREEDY, "max_tokens": DROP_MAX_TOKENS, "min_tokens": DROP_MAX_TOKENS}
    return dict(GREEDY)


def _v2_tensors(prompt: Prompt, job: Job, *, raw: bool) -> list[tuple[str, str, list[int], Any]]:
    """(name, datatype, shape, value): value is a JSON datum (raw=False) or raw bytes."""
    params = json.dumps(_params(job))
    out: list[tuple[str, str, list[int], Any]] = [("text_input", "BYTES", [1], prompt.text)]
    if prompt.image is not None:
        out.append(("image", "BYTES", [1], prompt.image if raw else base64.b64encode(prompt.image).decode()))
    out.append(("sampling_parameters", "BYTES", [1], params))
    if job.kind == "grpc_stream":
        out.append(("stream", "BOOL", [1], True))
    else:
        out.append(("exclude_input_in_output", "BOOL", [1], True))
    return out


def grpc_request(prompt: Prompt, job: Job) -> Any:
    from runtime import v2_grpc_predict_pb2 as pb

    req = pb.ModelInferRequest(model_name=MODEL, id=f"load-{id(job)}")
    for name, dtype, shape, value in _v2_tensors(prompt, job, raw=True):
        req.inputs.add(name=name, datatype=dtype, shape=shape)
        if dtype == "BOOL":
            req.raw_input_contents.append(b"\x01" if value else b"\x00")
        else:
            req.raw_input_contents.append(_bytes_tensor([value if isinstance(value, bytes) else value.encode()]))
    return req


def _grpc_outputs(resp: Any) -> dict[str, Any]:
    out = {}
    for i, o in enumerate(resp.outputs):
        raw = resp.raw_output_contents[i]
        if o.datatype == "BYTES":
            out[o.name] = raw[4:4 + int.from_bytes(raw[:4], "little")].decode()
        else:
            out[o.name] = int.from_bytes(raw[:4], "little", signed=True)
    return out


async def _http(session: Any, h: Harness, job: Job) -> Result:
    res = Result(job)
    prompt = h.prompts[job.key]
    params = _params(job)
    stream = job.kind.endswith("_stream")
    if job.kind.startswith("chat"):
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"model": MODEL, "messages": prompt.messages, **params}
    elif job.kind.startswith("completions"):
        path = "/v1/completions"
        body = {"model": MODEL, "prompt": prompt.text, **params}
    elif job.kind == "v2_infer":
        path = f"/v2/models/{MODEL}/infer"
        body = {"inputs": [{"name": n, "datatype": d, "shape": s, "data": [v]}
                           for n, d, s, v in _v2_tensors(prompt, job, raw=False)]}
    else:
        path = f"/v2/models/{MODEL}/generate_stream" if stream else f"/v2/models/{MODEL}/generate"
        body = {"text_input": prompt.text, "parameters": params, "exclude_input_in_output": True}
        if prompt.image is not None:
            body["image"] = [base64.b64encode(prompt.image).decode()]
    openai_route = job.kind.startswith(("chat", "completions"))
    if stream and openai_route:
        body.update(stream=True, stream_options={"include_usage": True})
    async with session.post(h.url + path, json=body) as resp:
        res.status = resp.status
        if resp.status != 200 or not stream:
            payload = await resp.read()
            if resp.status != 200:
                res.error = payload.decode(errors="replace")[:300]
                return res
            obj = json.loads(payload)
            if openai_route:
                c = obj["choices"][0]
                res.text = c["message"]["content"] if job.kind == "chat" else c["text"]
                res.finish, res.tokens = c["finish_reason"], obj["usage"]["completion_tokens"]
                res.prompt_tokens = obj["usage"]["prompt_tokens"]
            elif job.kind == "v2_infer":
                outs = {o["name"]: o["data"][0] for o in obj["outputs"]}
                res.text, res.finish, res.tokens = outs["text_output"], outs["finish_reason"], outs["num_output_tokens"]
                res.prompt_tokens = outs["num_input_tokens"]
            else:
                res.text, res.finish, res.tokens = obj["text_output"], obj["finish_reason"], obj["num_output_tokens"]
                res.prompt_tokens = obj["num_input_tokens"]
            return res
        buf = b""
        async for data in resp.content.iter_any():
            events, buf = _sse_events(buf + data.replace(b"\r\n", b"\n"))
            for ev in events:
                if ev == b"[DONE]":
                    continue
                obj = json.loads(ev)
                if "error" in obj:
                    res.error = f"stream error: {str(obj['error'])[:300]}"
                    continue
                res.chunks += 1
                if openai_route:
                    if obj.get("usage"):
                        res.tokens = obj["usage"]["completion_tokens"]
                        res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    for c in obj.get("choices") or ():
                        res.text += (c.get("delta") or {}).get("content") or c.get("text") or ""
                        res.finish = c.get("finish_reason") or res.finish
                else:
                    res.text += obj.get("text_output") or ""
                    res.tokens += int(obj.get("num_output_tokens") or 0)
                    res.finish = obj.get("finish_reason") or res.finish
                    res.prompt_tokens = obj.get("num_input_tokens") or res.prompt_tokens
            if job.mode == "drop" and res.chunks >= DROP_AFTER:
                resp.close()  # hang up mid-stream
                return res
    return res


async def _grpc(channel: Any, h: Harness, job: Job) -> Result:
    import grpc

    from runtime import v2_grpc_predict_pb2 as pb

    res = Result(job)
    req = grpc_request(h.prompts[job.key], job)
    try:
        if job.kind == "grpc_infer":
            call = channel.unary_unary(GRPC_INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelInferResponse.FromString)
            outs = _grpc_outputs(await call(req, timeout=300))
            res.status, res.text, res.finish, res.tokens = (200, outs["text_output"], outs["finish_reason"],
                                                            outs["num_output_tokens"])
            res.prompt_tokens = outs["num_input_tokens"]
            return res
        method = channel.stream_stream(GRPC_METHOD, request_serializer=pb.ModelInferRequest.SerializeToString,
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        call = method(timeout=300)
        await call.write(req)
        await call.done_writing()
        res.status = 200
        async for resp in call:
            if resp.error_message:
                res.status, res.error = 400, f"stream error: {resp.error_message[:300]}"
                continue
            outs = _grpc_outputs(resp.infer_response)
            res.chunks += 1
            res.text += outs.get("text_output", "")
            res.tokens += outs.get("num_output_tokens", 0)
            res.finish = outs.get("finish_reason") or res.finish
            res.prompt_tokens = outs.get("num_input_tokens") or res.prompt_tokens
            if job.mode == "drop" and res.chunks >= DROP_AFTER:
                call.cancel()
                return res
    except grpc.aio.AioRpcError as err:
        code = err.code()
        res.status = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404}.get(code, 500)
        res.error = f"{code.name}: {err.details()}"[:300]
    return res


async def _run(h: Harness, jobs: list[Job], concurrency: int) -> list[Result]:
    import aiohttp
    import grpc

    opts = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", -1)]
    channel = grpc.aio.insecure_channel(h.grpc_target, options=opts)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                    timeout=aiohttp.ClientTimeout(total=300))
    results: list[Result | None] = [None] * len(jobs)

    async def one(i: int) -> None:
        job = jobs[i]
        try:
            send = _grpc(channel, h, job) if job.kind.startswith("grpc") else _http(session, h, job)
            if job.mode == "hangup":
                try:
                    results[i] = await asyncio.wait_for(send, HANGUP_S)
                except asyncio.TimeoutError:
                    results[i] = Result(job, error="gave up")
            else:
                results[i] = await send
        except Exception as exc:  # noqa: BLE001 (a transport failure is a lost request)
            results[i] = Result(job, error=f"{type(exc).__name__}: {exc}"[:300])

    async def client(c: int) -> None:
        for i in range(c, len(jobs), concurrency):
            await one(i)

    try:
        await asyncio.gather(*(client(c) for c in range(concurrency)))
    finally:
        await session.close()
        await channel.close()
    return results  # type: ignore[return-value]


def run_mix(h: Harness, jobs: list[Job], concurrency: int) -> list[Result]:
    return asyncio.run(_run(h, jobs, concurrency))


# -- checks ---------------------------------------------------------------------------------------------
def check(results: list[Result], reference: dict[int, Result]) -> dict[str, int]:
    lost, fives, diverged, bad_poison, bad_drop = [], [], [], [], []
    for r in results:
        where = (r.job.kind, r.job.key, r.job.mode, r.status, r.error)
        if r.status >= 500:
            fives.append(where)
        if r.job.mode == "poison":
            if r.status != 400 or "seed" not in (r.error or ""):
                bad_poison.append(where)
        elif r.job.mode == "hangup":
            # Given up on mid-request; or, on a fast idle machine, answered (all its tokens made)
            # within HANGUP_S, before the client gave up: a 200 then, not a lost request.
            finished_in_time = r.status == 200 and not r.error
            if r.error != "gave up" and not finished_in_time:
                bad_drop.append(where)
        elif r.job.mode == "drop":
            if r.status != 200 or r.error or r.chunks < DROP_AFTER or r.finish is not None:
                bad_drop.append((*where, r.chunks, r.finish))
        elif r.status != 200 or r.error or r.tokens != OUT or r.finish != "length":
            lost.append((*where, r.tokens, r.finish))
        elif (r.text, r.prompt_tokens) != (ref := reference[r.job.key]).text_and_prompt():
            diverged.append((r.job.kind, r.job.key, r.text, r.prompt_tokens, ref.text_and_prompt()))
    assert not fives, fives
    assert not lost, lost
    assert not bad_poison, bad_poison
    assert not bad_drop, bad_drop
    assert not diverged, diverged
    return {mode: sum(r.job.mode == mode for r in results) for mode in ("greedy", "drop", "hangup", "poison")}


def wait_idle(server: Server, timeout: float = 30.0, settle: float = 1.0) -> dict:
    """The metrics once nothing has run or waited for ``settle`` seconds (a given-up request may
    still be in tokenisation when the gauges first read 0)."""
    deadline, idle_since = time.monotonic() + timeout, None
    while True:
        m = server.metrics()
        if metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:num_requests_waiting") == 0:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= settle:
                return m
        else:
            idle_since = None
        assert time.monotonic() < deadline, (m, server.tail())
        time.sleep(0.1)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    return tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("load_vlm"), seed=0)


@pytest.fixture(scope="module")
def server(vlm_dir, tmp_path_factory):
    with running(Server(vlm_dir, tmp_path_factory.mktemp("load") / "server.log")) as srv:
        yield srv


def test_mixed_load_64_clients(server, vlm_dir) -> None:
    h = Harness(server.url, f"127.0.0.1:{server.grpc_port}", make_prompts(vlm_dir))
    jobs = make_jobs()
    assert {j.kind for j in jobs if j.mode == "greedy"} == set(KINDS)
    assert {j.kind for j in jobs if j.mode == "poison"} == set(POISON_KINDS)
    assert {j.kind for j in jobs if j.mode == "drop"} == set(DROP_KINDS)
    assert {j.kind for j in jobs if j.mode == "hangup"} == set(HANGUP_KINDS)

    # The reference: each prompt alone (concurrency 1), on v2 generate.
    ref_jobs = [Job("v2_generate", k) for k in range(len(h.prompts))]
    ref = run_mix(h, ref_jobs, 1)
    assert all(r.status == 200 and r.tokens == OUT for r in ref), [(r.status, r.error) for r in ref]
    reference = {r.job.key: r for r in ref}
    assert all(r.text for r in ref) and len({r.text for r in ref}) > 1
    # The images' placeholder tokens are counted: 56x84 -> 4x6 patches -> 6, 84x84 -> 9.
    assert ref[NUM_TEXT].prompt_tokens > ref[0].prompt_tokens + 6

    figures = {}
    for phase in ("warm-up", "load"):
        before = wait_idle(server)
        t0 = time.monotonic()
        results = run_mix(h, jobs, CLIENTS)
        elapsed = time.monotonic() - t0
        counts = check(results, reference)
        after = wait_idle(server)
        finished = {reason: metric(after, "vllm:request_success_total", finished_reason=reason)
                    - metric(before, "vllm:request_success_total", finished_reason=reason)
                    for reason in ("length", "abort", "stop")}
        # Every dropped stream was aborted; a given-up request was aborted, or never reached the engine.
        # Every hangup job was aborted, or (on a fast machine) answered in full before its client
        # gave up: each one is counted once, as an abort or as a finish by length.
        answered = finished["length"] - counts["greedy"]
        assert 0 <= answered <= counts["hangup"] and finished["stop"] == 0, (finished, counts)
        assert counts["drop"] <= finished["abort"] <= counts["drop"] + counts["hangup"] - answered, (finished, counts)
        assert metric(after, "vllm:kv_cache_usage_perc") == 0
        figures[phase] = (len(results), round(elapsed, 1), server.rss() / 2**20, finished["abort"])
    print(f"\nload test figures (requests, seconds, RSS MiB, aborted): {figures}")
    rss_warm, rss_load = figures["warm-up"][2], figures["load"][2]
    assert abs(rss_load - rss_warm) <= 0.10 * rss_warm, figures
    # The server still answers after the load.
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/generate",
                   json={"text_input": "hi", "parameters": {"max_tokens": 2}}, timeout=60)
    assert r.status_code == 200, r.text
