"""Issue 13, "Robustness and consistency", against the real server (``python -m runtime`` serving
the tiny Qwen2-VL on 127.0.0.1) through real clients (httpx, openai, tritonclient http and grpc,
raw sockets where the point is a malformed or half-sent request):

* hostile JSON (arrays nested 100k deep, a 5000-digit integer, a lone surrogate), a v2
  ``datatype`` that is an object or a list, model versions, KServe v1 ``:predict`` / ``:explain``
  and a 64 KiB URL answer 4xx with a JSON error, not 5xx or plain text;
* ``max_tokens`` past the context gets the same 400 (INVALID_ARGUMENT) on every route;
* bounded work, with the documented flags' defaults: images per prompt, pixels per image and
  per request, decompression bombs (413), request body size (413), gzip inflation (413), and a
  body-read timeout (408);
* SIGTERM past the grace period: streams end with an error event (and ``[DONE]``), plain
  requests get 503 in JSON, gRPC streams an error response and unary calls UNAVAILABLE;
* the served OpenAPI schema publishes the request bodies of the OpenAI and generate routes;
* the README's Security section documents the new flags and ``VLMSERVE_API_KEY``.

The ``server`` fixture runs with the default limits (no new flag), so each check fails on a server
without the bound; ``stopping`` is a second server with a short grace period and body timeout,
which the last test stops with SIGTERM.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import queue
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from server_harness import REPO, ServerProcess, running, server_env
from test_server_v2 import grpcclient
from tiny_vlm import build_tiny_qwen2_vl
from tritonclient.utils import InferenceServerException

MAX_MODEL_LEN = 1024
GRACE_S = 1
LONG_TOKENS = 1900  # generations that outlast the grace period (the tiny model has 2048 positions)
BODY_TIMEOUT_S = 2
OPENAI_POSTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class Server(ServerProcess):
    def __init__(self, model_dir: Path, log_path: Path, extra: tuple[str, ...] = (),
                 max_model_len: int = MAX_MODEL_LEN) -> None:
        args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", str(max_model_len), *extra]
        super().__init__(model_dir, log_path, "tiny", args, server_env())


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("robust_vlm"))


@pytest.fixture(scope="module")
def server(vlm_dir, tmp_path_factory):
    with running(Server(vlm_dir, tmp_path_factory.mktemp("robust") / "server.log")) as srv:
        yield srv


@pytest.fixture(scope="module")
def stopping(vlm_dir, tmp_path_factory):
    """A server with a short grace period (dashed flag spelling) and body timeout, and room for
    generations that outlast the grace period (the tiny model makes ~300 tokens/s on a CPU)."""
    extra = ("--graceful-shutdown-timeout", str(GRACE_S), "--request-body-timeout", str(BODY_TIMEOUT_S))
    log = tmp_path_factory.mktemp("stopping") / "server.log"
    with running(Server(vlm_dir, log, extra, max_model_len=2048)) as srv:
        yield srv


def post(server, path: str, body: bytes | dict, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=120,
                      headers={"content-type": "application/json", **headers})


def error_of(resp: httpx.Response, status: int, *words: str) -> str:
    """The error message of a JSON error answer (OpenAI's shape or KServe's)."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    err = resp.json()["error"]
    message = err["message"] if isinstance(err, dict) else err
    for word in words:
        assert word in message, message
    return message


def png(mode: str, size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (size, size)).save(buf, format="PNG")
    return buf.getvalue()


def image_chat(*images: bytes) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(i).decode()}}
             for i in images]
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [*parts, {"type": "text",
                                                                                                   "text": "hi"}]}]}


def image_generate(*images: bytes) -> dict:
    return {"text_input": "hi", "image": [base64.b64encode(i).decode() for i in images],
            "parameters": {"max_tokens": 2}}


def text_input(value: str = "hi", **fields) -> dict:
    return {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [value], **fields}


def raw_exchange(server, head: bytes, body: bytes = b"", timeout: float = 15.0) -> tuple[bytes, bytes, float]:
    """Send ``head`` + ``body`` on a raw connection and read until the server closes it:
    (status line + headers, body, seconds taken)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as conn:
        conn.sendall(head + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    return top, rest, time.monotonic() - t0


def still_serving(server) -> None:
    assert post(server, "/v1/chat/completions", CHAT).status_code == 200


# -- 5xx or plain text where a 4xx in JSON belongs -----------------------------------------------------
def test_hostile_json_gets_400(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    long_int = b"1" * 5000
    for path in (*OPENAI_POSTS, "/v2/models/tiny/generate", "/v2/models/tiny/infer"):
        error_of(post(server, path, deep), 400, "deeper")
        error_of(post(server, path, b'{"model": "tiny", "max_tokens": ' + long_int + b"}"), 400, "digits")
    # Nested deep inside a field, but not past Python's recursion limit: still refused at the edge.
    nested = {"inputs": [text_input(), {"name": "image", "datatype": "BYTES", "shape": [1],
                                        "data": json.loads("[" * 500 + '"x"' + "]" * 500)}]}
    error_of(post(server, "/v2/models/tiny/infer", nested), 400, "deeper")
    sp = {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "data": ['{"seed": ' + "9" * 5000 + "}"]}
    error_of(post(server, "/v2/models/tiny/infer", {"inputs": [text_input(), sp]}), 400, "sampling_parameters")
    error_of(post(server, "/v2/models/tiny/generate", {"text_input": "hi", "sampling_parameters": "[" * 5000}),
             400, "sampling_parameters")

    # A lone surrogate: completions answered 500 (chat 400 by accident of its template).
    lone = b'"a\\ud800b"'
    for path, body in (("/v1/completions", b'{"model": "tiny", "max_tokens": 2, "prompt": ' + lone + b"}"),
                       ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": '
                        + lone + b"}]}"),
                       ("/v1/completions", b'{"model": "tiny", "prompt": "hi", "stop": [' + lone + b"]}"),
                       ("/v2/models/tiny/generate", b'{"text_input": ' + lone + b"}")):
        error_of(post(server, path, body), 400, "surrogate")
    resp = post(server, "/v1/completions", b'{"model": "tiny", "max_tokens": 2, "prompt": ' + lone + b"}")
    assert resp.json()["error"]["param"] == "prompt"
    # A valid pair is text like any other.
    assert post(server, "/v1/completions", b'{"model": "tiny", "max_tokens": 2, "prompt": "a\\ud83d\\ude00"}'
                ).status_code == 200

    for datatype in ({"a": 1}, ["BYTES"]):
        error_of(post(server, "/v2/models/tiny/infer", {"inputs": [text_input(datatype=datatype)]}), 400,
                 "datatype")
    still_serving(server)


def test_model_versions_and_kserve_v1_get_json_4xx(server):
    assert httpx.get(f"{server.url}/v2/models/tiny/versions/1/ready", timeout=10).json()["ready"] is True
    assert httpx.get(f"{server.url}/v2/models/tiny/versions/1", timeout=10).json()["name"] == "tiny"
    for path in ("/v2/models/tiny/versions/2", "/v2/models/tiny/versions/2/ready"):
        error_of(httpx.get(server.url + path, timeout=10), 404, "version")
    error_of(post(server, "/v2/models/tiny/versions/2/generate", {"text_input": "hi"}), 404, "version")
    assert post(server, "/v2/models/tiny/versions/1/generate",
                {"text_input": "hi", "parameters": {"max_tokens": 2}}).status_code == 200
    http = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    try:
        for client, module, code in ((http, httpclient, "404"), (grpc, grpcclient, "NOT_FOUND")):
            t = module.InferInput("text_input", [1], "BYTES")
            t.set_data_from_numpy(np.array([b"hi"], dtype=object))
            with pytest.raises(InferenceServerException) as err:
                client.infer("tiny", [t], model_version="2")
            assert code in str(err.value.status()) and "version" in err.value.message()
    finally:
        http.close()
        grpc.close()
    for verb in ("predict", "explain"):
        error_of(post(server, f"/v1/models/tiny:{verb}", {"instances": [1]}), 404, "v1 protocol")


def test_what_uvicorn_refuses_is_json(server):
    head = b"GET /v1/models/" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    top, body, _ = raw_exchange(server, head)
    assert top.startswith(b"HTTP/1.1 414") and b"application/json" in top, top
    assert "URL" in json.loads(body)["error"]["message"]
    top, body, _ = raw_exchange(server, b"GET /v2 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert top.startswith(b"HTTP/1.1 400") and b"application/json" in top, top
    assert "malformed" in json.loads(body)["error"]


# -- one validation on every route --------------------------------------------------------------------
def test_max_tokens_past_the_context_is_the_same_400_everywhere(server):
    words = ("max_tokens", "max_model_len", str(MAX_MODEL_LEN))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="hi", max_tokens=100_000)
    assert all(w in err.value.body["message"] for w in words)
    error_of(post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 100_000}), 400, *words)
    error_of(post(server, "/v2/models/tiny/generate", {"text_input": "hi", "parameters": {"max_tokens": 100_000}}),
             400, *words)
    http = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    try:
        for client, module, code in ((http, httpclient, "400"), (grpc, grpcclient, "INVALID_ARGUMENT")):
            t = module.InferInput("text_input", [1], "BYTES")
            t.set_data_from_numpy(np.array([b"hi"], dtype=object))
            p = module.InferInput("sampling_parameters", [1], "BYTES")
            p.set_data_from_numpy(np.array([b'{"max_tokens": 100000}'], dtype=object))
            with pytest.raises(InferenceServerException) as err:
                client.infer("tiny", [t, p])
            assert code in str(err.value.status()) and all(w in err.value.message() for w in words)
    finally:
        http.close()
        grpc.close()


# -- bounded work ----------------------------------------------------------------------------------------
def test_images_per_prompt_have_a_default_limit(server):
    small = png("RGB", 56)
    error_of(post(server, "/v1/chat/completions", image_chat(*[small] * 9)), 400, "at most 8", "--limit-mm-per-prompt")
    error_of(post(server, "/v2/models/tiny/generate", image_generate(*[small] * 9)), 400, "at most 8")
    assert post(server, "/v1/chat/completions", image_chat(small, small)).status_code == 200


def test_decoded_pixels_are_bounded_per_image_and_per_request(server):
    black = png("L", 8000)  # 64 Mpixel, ~60 KiB on disk: under the old per-image limit (8192^2)
    assert len(black) < 200_000
    error_of(post(server, "/v1/chat/completions", image_chat(black)), 413, "8000x8000", "--max-image-pixels")
    error_of(post(server, "/v2/models/tiny/generate", image_generate(black)), 413, "8000x8000")
    six = png("L", 6000)  # 36 Mpixel each: allowed alone, not two in one request
    error_of(post(server, "/v1/chat/completions", image_chat(six, six)), 413, "--max-request-image-pixels")
    error_of(post(server, "/v2/models/tiny/generate", image_generate(six, six)), 413, "--max-request-image-pixels")
    bomb = png("1", 20_000)  # past PIL's own decompression-bomb limit: PIL's error was a 400
    error_of(post(server, "/v1/chat/completions", image_chat(bomb)), 413, "--max-image-pixels")
    error_of(post(server, "/v2/models/tiny/generate", image_generate(bomb)), 413, "--max-image-pixels")
    assert post(server, "/v1/chat/completions", image_chat(six)).status_code == 200


def test_request_body_size_is_bounded(server):
    limit = 64 * 1024 * 1024
    # Declared too large: answered at once, without reading it.
    for path in ("/v1/chat/completions", "/v2/models/tiny/generate"):
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {100 * 1024 * 1024}\r\n\r\n").encode()
        top, body, _ = raw_exchange(server, head, b'{"model": ')
        assert top.startswith(b"HTTP/1.1 413") and b"application/json" in top, top
        assert "--max-request-body-bytes" in json.dumps(json.loads(body))
    # A real client sending all of it reads the 413 (not a reset).
    big = b'{"model": "tiny", "prompt": 1, "pad": "' + b"x" * limit + b'"}'
    error_of(post(server, "/v1/completions", big), 413, "--max-request-body-bytes")
    # Sent chunked, without a length: counted as it arrives.
    mib = 1 << 20
    chunks = (big[i:i + mib] for i in range(0, len(big), mib))
    resp = httpx.post(f"{server.url}/v2/models/tiny/generate", content=chunks, timeout=120)
    error_of(resp, 413, "--max-request-body-bytes")
    still_serving(server)


def test_gzip_body_inflation_is_bounded(server):
    bomb = gzip.compress(b"0" * (200 * 1024 * 1024), compresslevel=9)  # ~200 KiB
    assert len(bomb) < 250_000
    resp = post(server, "/v2/models/tiny/infer", bomb, **{"content-encoding": "gzip"})
    error_of(resp, 413, "inflates", "--max-request-body-bytes")
    # A gzip body within the limit is served.
    body = gzip.compress(json.dumps({"inputs": [text_input(), {
        "name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "data": ['{"max_tokens": 2}']}]}).encode())
    assert post(server, "/v2/models/tiny/infer", body, **{"content-encoding": "gzip"}).status_code == 200


def test_half_sent_body_times_out_with_408(stopping):
    for path in ("/v1/chat/completions", "/v2/models/tiny/generate"):
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 100\r\n\r\n").encode()
        top, body, took = raw_exchange(stopping, head, b'{"mod')
        assert top.startswith(b"HTTP/1.1 408") and b"application/json" in top, top
        assert "--request-body-timeout" in json.dumps(json.loads(body))
        assert BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + 3, took


# -- the served schema and the docs ----------------------------------------------------------------------
def test_openapi_publishes_request_bodies(server):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    components = schema["components"]["schemas"]
    posts = [f"{prefix}{path}" for prefix in ("", "/openai") for path in OPENAI_POSTS]
    posts += ["/v2/models/{model_name}/generate", "/v2/models/{model_name}/generate_stream"]
    fields = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input", "generate": "text_input",
              "generate_stream": "text_input"}
    for path in posts:
        body = schema["paths"][path]["post"]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        name = ref.removeprefix("#/components/schemas/")
        field = next(v for k, v in fields.items() if path.endswith("/" + k))
        assert field in components[name]["properties"], (path, name)
    # Every reference in the schema resolves.
    for ref in set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(schema))):
        assert ref.removeprefix("#/components/schemas/") in components, ref


def test_readme_documents_the_limits_and_the_key_variable():
    readme = (REPO / "README.md").read_text()
    security = readme.split("## Security", 1)[1].split("\n## ", 1)[0]
    for flag in ("--limit-mm-per-prompt", "--max-image-pixels", "--max-request-image-pixels",
                 "--max-request-body-bytes", "--request-body-timeout", "--graceful-shutdown-timeout",
                 "VLMSERVE_API_KEY"):
        assert flag in security, flag


def test_graceful_shutdown_timeout_takes_both_spellings():
    from runtime.__main__ import build_parser
    from runtime.args import normalize_argv

    parser = build_parser()
    for flag in ("--graceful_shutdown_timeout", "--graceful-shutdown-timeout"):
        ns = parser.parse_args(normalize_argv(["--model_name", "m", flag, "7"], parser))
        assert ns.graceful_shutdown_timeout == 7


# -- SIGTERM past the grace period --------------------------------------------------------------------
def in_engine(server, count: int, timeout: float = 60) -> None:
    """Wait until ``count`` requests are running or waiting in the engine (read from /metrics)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        found = sum(float(m) for m in re.findall(
            r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} (\S+)$", text, re.MULTILINE))
        if found >= count:
            return
        assert time.monotonic() < deadline, f"{found} of {count} requests reached the engine"
        time.sleep(0.05)


def test_sigterm_past_grace_answers_every_request(stopping):
    long = {"max_tokens": LONG_TOKENS, "ignore_eos": True}
    results: dict[str, object] = {}

    def sse(name: str, path: str, body: dict) -> None:
        with httpx.Client(timeout=60) as h, h.stream("POST", stopping.url + path, json=body) as r:
            results[name] = (r.status_code, [line[6:] for line in r.iter_lines() if line.startswith("data: ")])

    def plain(name: str, path: str, body: dict) -> None:
        results[name] = httpx.post(stopping.url + path, json=body, timeout=60)

    calls = [
        (sse, "completions_stream", "/v1/completions", {"model": "tiny", "prompt": "Hello", "stream": True, **long}),
        (sse, "chat_stream", "/v1/chat/completions", {**CHAT, "stream": True, **long}),
        (sse, "generate_stream", "/v2/models/tiny/generate_stream", {"text_input": "Hello", "parameters": long}),
        (plain, "chat", "/v1/chat/completions", {**CHAT, **long}),
        (plain, "generate", "/v2/models/tiny/generate", {"text_input": "Hello", "parameters": long}),
    ]
    threads = [threading.Thread(target=fn, args=args) for fn, *args in calls]
    grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{stopping.grpc_port}")
    stream: queue.Queue = queue.Queue()
    grpc.start_stream(callback=lambda result, error: stream.put((result, error)))

    def grpc_inputs(streaming: bool) -> list:
        t = grpcclient.InferInput("text_input", [1], "BYTES")
        t.set_data_from_numpy(np.array([b"Hello"], dtype=object))
        p = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        p.set_data_from_numpy(np.array([json.dumps(long).encode()], dtype=object))
        s = grpcclient.InferInput("stream", [1], "BOOL")
        s.set_data_from_numpy(np.array([streaming]))
        return [t, p, s]

    def grpc_unary() -> None:
        try:
            results["grpc_unary"] = grpc.infer("tiny", grpc_inputs(False), client_timeout=60)
        except InferenceServerException as exc:
            results["grpc_unary"] = exc

    threads.append(threading.Thread(target=grpc_unary))
    try:
        grpc.async_stream_infer("tiny", grpc_inputs(True), request_id="g1")
        for t in threads:
            t.start()
        assert stream.get(timeout=60)[1] is None  # the gRPC stream is generating
        in_engine(stopping, len(threads) + 1)  # a fixed sleep let a slow CI machine signal too early
        stopping.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for t in threads:
            t.join(60)
        took = time.monotonic() - t0
        errors = []
        while True:  # the stream's pieces, then its error response
            result, error = stream.get(timeout=30)
            if error is not None:
                errors.append(error)
                break
    finally:
        grpc.stop_stream()
        grpc.close()
    assert GRACE_S - 0.5 < took < GRACE_S + 4, took

    for name in ("completions_stream", "chat_stream"):
        status, events = results[name]
        assert status == 200 and events[-1] == "[DONE]", (name, events[-3:])
        err = json.loads(events[-2])["error"]
        assert err["code"] == "server_shutting_down" and "grace period" in err["message"], err
    status, events = results["generate_stream"]
    assert status == 200 and "grace period" in json.loads(events[-1])["error"], events[-3:]
    error_of(results["chat"], 503, "grace period")
    error_of(results["generate"], 503, "grace period")
    assert "grace period" in errors[0].message(), errors
    unary = results["grpc_unary"]
    assert isinstance(unary, InferenceServerException), unary
    assert "UNAVAILABLE" in str(unary.status()) and "grace period" in unary.message()
    assert stopping.proc.wait(30) == 0, stopping.tail()
