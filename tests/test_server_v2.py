"""The Open Inference Protocol (v2) of the real server (``python -m runtime`` as a subprocess on
free ports, serving the tiny Qwen2-VL) through the real clients ``tritonclient.http`` and
``tritonclient.grpc``: health and metadata, infer (binary and JSON REST, gRPC) against the
offline engine, text + image, the generate extension (and SSE), gRPC ModelStreamInfer, bad
inputs and the API key."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from server_harness import running
from test_server_openai import API_KEY, AUTH, MAX_MODEL_LEN, Server
from tiny_vlm import build_tiny_qwen2_vl, random_image
from tritonclient.utils import InferenceServerException

from engine import LLM, SamplingParams

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
IMAGE_TEXT = "Describe the picture."
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
MAX_TOKENS = 12
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS}


def _import_tritonclient_grpc():
    """``tritonclient.grpc`` with its messages in a private protobuf pool: KServe's
    ``grpc_predict_v2_pb2`` (imported by ``runtime``) registers the same ``inference.*`` names in
    the default pool, and one pool cannot hold both ("duplicate symbol")."""
    if "tritonclient.grpc" in sys.modules:
        return sys.modules["tritonclient.grpc"]
    from google.protobuf import descriptor_pool

    private, default = descriptor_pool.DescriptorPool(), descriptor_pool.Default
    descriptor_pool.Default = lambda: private
    try:
        import tritonclient.grpc as grpcclient
    finally:
        descriptor_pool.Default = default
    return grpcclient


grpcclient = _import_tritonclient_grpc()
GRPC_AUTH = {"authorization": f"Bearer {API_KEY}"}


def _auth() -> dict[str, str]:
    """A fresh header dict per call: tritonclient.http adds its own headers to the dict it is given."""
    return dict(AUTH)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("v2_vlm"))


@pytest.fixture(scope="module")
def server(vlm_dir, tmp_path_factory):
    srv = Server(vlm_dir, tmp_path_factory.mktemp("v2_server") / "server.log")
    with running(srv, lambda: LLM(model=str(vlm_dir), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN)):
        yield srv


@pytest.fixture(scope="module")
def offline(server):
    return server.offline


@pytest.fixture(scope="module")
def http(server):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server):
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def _ref(offline, prompt) -> object:
    return offline.generate(prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]


def _inputs(module, text: str, *, params=None, images=(), binary=True, stream=None, exclude=None):
    def tensor(name, datatype, values):
        t = module.InferInput(name, [len(values)], datatype)
        arr = np.array(values, dtype=object if datatype == "BYTES" else bool)
        if module is httpclient:
            t.set_data_from_numpy(arr, binary_data=binary)
        else:
            t.set_data_from_numpy(arr)
        return t

    out = [tensor("text_input", "BYTES", [text.encode()])]
    if params is not None:
        out.append(tensor("sampling_parameters", "BYTES", [json.dumps(params).encode()]))
    if images:
        out.append(tensor("image", "BYTES", list(images)))
    if stream is not None:
        out.append(tensor("stream", "BOOL", [stream]))
    if exclude is not None:
        out.append(tensor("exclude_input_in_output", "BOOL", [exclude]))
    return out


def _text(result, name="text_output") -> str:
    value = result.as_numpy(name)
    if value is None:
        return None
    item = value.reshape(-1)[0]
    return item.decode() if isinstance(item, bytes) else item  # JSON outputs come back as str


def test_health_and_metadata(server, http, grpc):
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("tiny")
    meta = http.get_model_metadata("tiny", headers=_auth())
    assert {i["name"] for i in meta["inputs"]} >= {"text_input", "image", "sampling_parameters", "stream",
                                                   "exclude_input_in_output"}
    assert {o["name"] for o in meta["outputs"]} == {"text_output", "finish_reason", "num_input_tokens",
                                                    "num_output_tokens"}
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready("tiny")
    assert grpc.get_server_metadata(headers=GRPC_AUTH).name
    gmeta = grpc.get_model_metadata("tiny", headers=GRPC_AUTH)
    assert gmeta.name == "tiny" and "text_input" in [t.name for t in gmeta.inputs]
    assert "text_output" in [t.name for t in gmeta.outputs]
    with pytest.raises(InferenceServerException) as err:  # non-health rpcs need the key
        grpc.get_model_metadata("tiny")
    assert "UNAUTHENTICATED" in str(err.value.status())
    with pytest.raises(InferenceServerException) as err:
        grpc.load_model("tiny", headers=GRPC_AUTH)
    assert "UNIMPLEMENTED" in str(err.value.status())


def test_infer_text_http_binary_json_and_grpc(server, http, grpc, offline):
    ref = _ref(offline, PROMPT).outputs[0]
    # Binary tensors both ways (tritonclient.http's default), outputs not listed.
    r = http.infer("tiny", _inputs(httpclient, PROMPT, params=GREEDY, exclude=True), headers=_auth())
    assert _text(r) == ref.text
    assert _text(r, "finish_reason") == ref.finish_reason
    assert int(r.as_numpy("num_output_tokens")[0]) == len(ref.token_ids)
    assert int(r.as_numpy("num_input_tokens")[0]) == len(offline.get_tokenizer()(PROMPT).input_ids)
    # JSON tensors both ways; the prompt is prepended by default (Triton's vLLM convention).
    outs = [httpclient.InferRequestedOutput("text_output", binary_data=False),
            httpclient.InferRequestedOutput("finish_reason", binary_data=False)]
    r = http.infer("tiny", _inputs(httpclient, PROMPT, params=GREEDY, binary=False), outputs=outs, headers=_auth())
    assert _text(r) == PROMPT + ref.text and r.as_numpy("num_output_tokens") is None
    assert r.get_response()["outputs"][0]["data"] == [PROMPT + ref.text]
    # Plain JSON, request-level sampling parameters.
    body = {"id": "j1", "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}],
            "parameters": {"temperature": 0, "max_tokens": MAX_TOKENS}}
    j = httpx.post(f"{server.url}/v2/models/tiny/infer", json=body, headers=_auth(), timeout=60).json()
    assert j["model_name"] == "tiny" and j["id"] == "j1"
    assert {o["name"]: o["data"][0] for o in j["outputs"]}["text_output"] == PROMPT + ref.text
    # gRPC (raw_input_contents in, raw_output_contents out).
    g = grpc.infer("tiny", _inputs(grpcclient, PROMPT, params=GREEDY, exclude=True), headers=GRPC_AUTH,
                   request_id="g1")
    assert _text(g) == ref.text and _text(g, "finish_reason") == ref.finish_reason
    assert g.get_response().id == "g1" and int(g.as_numpy("num_output_tokens")[0]) == len(ref.token_ids)


def test_infer_with_image_matches_offline(server, http, grpc, offline):
    img = random_image(56, 84, seed=5)
    ref = _ref(offline, {"prompt": PLACEHOLDER + IMAGE_TEXT, "multi_modal_data": {"image": [img]}}).outputs[0]
    # HTTP binary: raw PNG bytes.
    r = http.infer("tiny", _inputs(httpclient, IMAGE_TEXT, params=GREEDY, images=[_png(img)], exclude=True),
                   headers=_auth())
    assert _text(r) == ref.text
    text_only = _ref(offline, IMAGE_TEXT).outputs[0].text
    assert int(r.as_numpy("num_input_tokens")[0]) > len(offline.get_tokenizer()(IMAGE_TEXT).input_ids)
    # gRPC: a base64 string; the placeholder already in the text is used as is.
    g = grpc.infer("tiny", _inputs(grpcclient, PLACEHOLDER + IMAGE_TEXT, params=GREEDY,
                                   images=[base64.b64encode(_png(img))], exclude=True), headers=GRPC_AUTH)
    assert _text(g) == ref.text
    assert ref.text != text_only or len(ref.text) == 0  # the image matters (random weights: usually)


def test_generate_extension_and_sse(server, offline):
    ref = _ref(offline, PROMPT).outputs[0]
    body = {"text_input": PROMPT, "parameters": GREEDY, "exclude_input_in_output": True}
    r = httpx.post(f"{server.url}/v2/models/tiny/generate", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["model_name"] == "tiny" and j["model_version"] == "1"
    assert j["text_output"] == ref.text and j["finish_reason"] == ref.finish_reason
    assert j["num_output_tokens"] == len(ref.token_ids)
    # The default prepends the prompt; sampling_parameters may be a JSON object.
    r = httpx.post(f"{server.url}/v2/models/tiny/generate", json={"text_input": PROMPT, "sampling_parameters": GREEDY},
                   headers=_auth(), timeout=60)
    assert r.json()["text_output"] == PROMPT + ref.text

    events = []
    with httpx.stream("POST", f"{server.url}/v2/models/tiny/generate_stream", json=body, headers=_auth(),
                      timeout=60) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert len(events) > 2
    assert "".join(e["text_output"] for e in events) == ref.text
    assert [e.get("finish_reason") for e in events][-1] == ref.finish_reason
    assert all("finish_reason" not in e for e in events[:-1])
    assert sum(e["num_output_tokens"] for e in events) == len(ref.token_ids)


def test_grpc_stream_infer(server, grpc):
    full = _text(grpc.infer("tiny", _inputs(grpcclient, PROMPT, params=GREEDY, exclude=True), headers=GRPC_AUTH))
    results: queue.Queue = queue.Queue()
    grpc.start_stream(callback=lambda result, error: results.put((result, error)), headers=GRPC_AUTH)
    try:
        grpc.async_stream_infer("tiny", _inputs(grpcclient, PROMPT, params=GREEDY, stream=True), request_id="s1")
        deltas, finishes = [], []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            resp = result.get_response()
            assert resp.id == "s1"
            deltas.append(_text(result))
            finishes.append(_text(result, "finish_reason"))
            if resp.parameters["triton_final_response"].bool_param:
                break
        assert len(deltas) > 2 and "".join(deltas) == full  # streamed pieces never repeat the prompt
        assert finishes[-1] in ("stop", "length") and finishes[:-1] == [None] * (len(finishes) - 1)
        # On the same stream: a bad request answers an error, and a non-streamed one its whole text.
        grpc.async_stream_infer("tiny", _inputs(grpcclient, PROMPT, params={"temperature": "hot"}), request_id="bad")
        result, error = results.get(timeout=60)
        assert isinstance(error, InferenceServerException) and "temperature" in error.message()
        grpc.async_stream_infer("tiny", _inputs(grpcclient, PROMPT, params=GREEDY, exclude=True), request_id="s2")
        result, error = results.get(timeout=60)
        assert error is None and _text(result) == full
        assert result.get_response().parameters["triton_final_response"].bool_param
    finally:
        grpc.stop_stream()


def test_bad_inputs_and_api_key(server, http, grpc):
    def post(body, headers=None, path="/v2/models/tiny/infer") -> httpx.Response:
        return httpx.post(server.url + path, json=body, headers=_auth() if headers is None else headers,
                          timeout=60)

    def text_in(value=PROMPT):
        return {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [value]}

    def check(resp: httpx.Response, status: int, *words: str) -> None:
        assert resp.status_code == status, resp.text
        assert set(resp.json()) == {"error"}
        for w in words:
            assert w in resp.json()["error"], resp.json()

    sp = {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "data": ["{temperature: 0"]}
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"not an image").decode()]}
    stream = {"name": "stream", "datatype": "BOOL", "shape": [1], "data": [True]}
    check(post({"inputs": [sp]}), 400, "text_input")
    check(post({"inputs": [text_in(), sp]}), 400, "sampling_parameters", "JSON")
    check(post({"inputs": [text_in(), image]}), 400, "image")
    check(post({"inputs": [text_in(), stream]}), 400, "stream")
    check(post({"inputs": [text_in()], "parameters": {"max_tokens": -3}}), 400, "max_tokens")
    check(post({"inputs": [{**text_in(), "shape": [2]}]}), 400, "text_input")
    check(post({"inputs": [text_in()]}, path="/v2/models/nope/infer"), 404, "nope")
    check(post({"text_input": PROMPT, "parameters": {"top_k": "x"}}, path="/v2/models/tiny/generate"), 400, "top_k")
    check(post({"parameters": {}}, path="/v2/models/tiny/generate_stream"), 400, "text_input")
    # The API key guards infer and generate.
    assert post({"inputs": [text_in()]}, headers={}).status_code == 401
    assert post({"text_input": PROMPT}, headers={}, path="/v2/models/tiny/generate").status_code == 401

    # The real clients see the same errors.
    with pytest.raises(InferenceServerException) as err:
        http.infer("tiny", _inputs(httpclient, PROMPT, images=[b"\x89PNG broken"]), headers=_auth())
    assert err.value.status() == "400" and "image" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        http.infer("tiny", [_inputs(httpclient, PROMPT, params={})[1]], headers=_auth())
    assert "text_input" in err.value.message()
    for inputs, word in ((_inputs(grpcclient, PROMPT, params={"bogus": 1}), "bogus"),
                         (_inputs(grpcclient, PROMPT, images=[b"garbage bytes"]), "image"),
                         (_inputs(grpcclient, PROMPT, stream=True), "stream")):
        with pytest.raises(InferenceServerException) as err:
            grpc.infer("tiny", inputs, headers=GRPC_AUTH)
        assert "INVALID_ARGUMENT" in str(err.value.status()) and word in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        grpc.infer("tiny", _inputs(grpcclient, PROMPT))
    assert "UNAUTHENTICATED" in str(err.value.status())
    # Still serving.
    r = grpc.infer("tiny", _inputs(grpcclient, PROMPT, params={"max_tokens": 2, "ignore_eos": True}),
                   headers=GRPC_AUTH)
    assert int(r.as_numpy("num_output_tokens")[0]) == 2
    assert http.infer("tiny", _inputs(httpclient, PROMPT, params={"max_tokens": 2}), headers=_auth()).as_numpy(
        "text_output") is not None


def test_text_only_model_rejects_images():
    from engine.config import EngineArgs
    from engine.media import MediaLoader
    from runtime.model import VLMModel
    from runtime.v2_codec import V2Error
    from runtime.v2_dataplane import V2DataPlane

    model = VLMModel("text", EngineArgs(model="unused"))
    model.llm = SimpleNamespace(processor=SimpleNamespace(mm_processor=None),
                                tokenizer=lambda text: SimpleNamespace(input_ids=[1, 2]))
    model._media_loader = MediaLoader()
    req = SimpleNamespace(text="hi", images=[_png(random_image(28, 28))])
    try:
        with pytest.raises(V2Error) as err:
            asyncio.run(V2DataPlane.prompt(model, req))
    finally:
        model._tokenize_pool.shutdown()
    assert err.value.status == 400 and "image" in err.value.message and "text only" in err.value.message


def test_generated_grpc_modules_are_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("protos_generate", REPO / "protos" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.stale() == [], "run: python protos/generate.py"
