"""Requests that once killed the engine core for everyone (issue 13, "one request kills the
engine"): sampling parameters outside what the sampler can take (a seed torch cannot seed a
generator with, a top_k that overflows int64) crashed the core process, failing every in-flight
stream, with a traceback in the 500.

The real server (``python -m runtime`` on the tiny Qwen2, API key on) is sent each poison on
every route: OpenAI chat and completions (the ``openai`` client), v2 generate (httpx), v2 infer
(``tritonclient.http``) and gRPC ModelInfer (``tritonclient.grpc``), while a stream started
before them runs. Each must be a 400 / INVALID_ARGUMENT naming the field, without a traceback;
the stream must finish normally and every route must still serve. Unit tests cover the shared
validation (``SamplingParams``), the engine core surviving a failing step, and 500 bodies.
"""

from __future__ import annotations

import json
import math
import threading
from multiprocessing import Pipe
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
import tritonclient.http as httpclient
from server_harness import running
from test_server_openai import API_KEY, AUTH, Server
from test_server_v2 import _import_tritonclient_grpc
from tritonclient.utils import InferenceServerException

from engine import LLM, SamplingParams
from engine.core_process import recv_msg, send_msg, serve_core
from engine.engine_core import StepError
from engine.request import EngineRequest
from engine.sampler import Sampler
from engine.sampling_params import MAX_N

grpcclient = _import_tritonclient_grpc()
GRPC_AUTH = {"authorization": f"Bearer {API_KEY}"}
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": PROMPT}]
SAMPLED = {"temperature": 1.0, "max_tokens": 3}  # the poisons only bite when sampling (temperature > 0)

# name -> (sampling parameters, the field the 400 must name)
POISONS: dict[str, tuple[dict[str, Any], str]] = {
    "seed_2**64": ({"seed": 2**64}, "seed"),
    "seed_-2**63-1": ({"seed": -(2**63) - 1}, "seed"),
    "top_k_2**63": ({"top_k": 2**63}, "top_k"),
    "top_k_1e19": ({"top_k": 1e19}, "top_k"),
}
# n is an OpenAI parameter only: the second sample's seed, 2**64, cannot seed a generator.
OPENAI_POISONS = {"seed_2**64-1_n2": ({"seed": 2**64 - 1, "n": 2}, "seed")}
TRACEBACK_MARKS = ("Traceback", 'File "', ".py", "line ")


# -- routes: each answers (status, error text); status 200 when the request succeeded -------------------
def _chat(server, params: dict[str, Any]) -> tuple[int, str]:
    return _openai(lambda c, extra: c.chat.completions.create(model="tiny", messages=MESSAGES, extra_body=extra),
                   server, params)


def _completions(server, params: dict[str, Any]) -> tuple[int, str]:
    return _openai(lambda c, extra: c.completions.create(model="tiny", prompt=PROMPT, extra_body=extra),
                   server, params)


def _openai(call, server, params: dict[str, Any]) -> tuple[int, str]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    try:
        call(client, {**SAMPLED, **params})  # extra_body: sent as given (seeds past int64, floats)
    except openai.APIStatusError as err:
        return err.status_code, err.response.text
    return 200, ""


def _v2_generate(server, params: dict[str, Any]) -> tuple[int, str]:
    body = {"text_input": PROMPT, "parameters": {**SAMPLED, **params}}
    r = httpx.post(f"{server.url}/v2/models/tiny/generate", json=body, headers=AUTH, timeout=60)
    return r.status_code, "" if r.status_code == 200 else r.text


def _tensors(module, params: dict[str, Any]) -> list[Any]:
    out = []
    for name, value in (("text_input", PROMPT), ("sampling_parameters", json.dumps({**SAMPLED, **params}))):
        t = module.InferInput(name, [1], "BYTES")
        t.set_data_from_numpy(np.array([value.encode()], dtype=object))
        out.append(t)
    return out


def _v2_infer(server, params: dict[str, Any]) -> tuple[int, str]:
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    try:
        client.infer("tiny", _tensors(httpclient, params), headers=dict(AUTH))
    except InferenceServerException as err:
        return int(err.status()), err.message()
    finally:
        client.close()
    return 200, ""


def _grpc(server, params: dict[str, Any]) -> tuple[int, str]:
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    try:
        client.infer("tiny", _tensors(grpcclient, params), headers=GRPC_AUTH)
    except InferenceServerException as err:
        return (400 if "INVALID_ARGUMENT" in str(err.status()) else 500), f"{err.status()}: {err.message()}"
    finally:
        client.close()
    return 200, ""


ROUTES = {"chat": _chat, "completions": _completions, "v2_generate": _v2_generate, "v2_infer": _v2_infer,
          "grpc": _grpc}


def _cases() -> list[tuple[str, str, dict[str, Any], str]]:
    cases = [(route, name, params, field) for route in ROUTES for name, (params, field) in POISONS.items()]
    cases += [(route, name, params, field) for route in ("chat", "completions")
              for name, (params, field) in OPENAI_POISONS.items()]
    return cases


@pytest.fixture(scope="module")
def server(tiny_qwen2, tmp_path_factory):
    srv = Server(tiny_qwen2, tmp_path_factory.mktemp("poison") / "server.log")
    with running(srv):
        yield srv


def _stream(server, max_tokens: int, first: threading.Event, result: dict[str, Any]) -> None:
    """A sampled chat stream; records its chunks (or the error) in ``result``."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    try:
        chunks = client.chat.completions.create(
            model="tiny", messages=MESSAGES, stream=True, max_tokens=max_tokens, temperature=1.0, seed=3,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        result["chunks"] = []
        for chunk in chunks:
            result["chunks"].append(chunk)
            first.set()
    except Exception as exc:  # noqa: BLE001 (checked by the test)
        result["error"] = exc
    finally:
        first.set()


def test_poisons_answer_400_on_every_route_and_an_inflight_stream_survives(server):
    # ~300 sampled tokens take several seconds on the tiny CPU model: in flight throughout.
    max_tokens = 300
    first, result = threading.Event(), {}
    streamer = threading.Thread(target=_stream, args=(server, max_tokens, first, result))
    streamer.start()
    assert first.wait(60) and "error" not in result, result

    problems = []
    for route, name, params, field in _cases():
        try:
            status, text = ROUTES[route](server, params)
        except Exception as exc:  # noqa: BLE001 (e.g. the server is gone: reported with the others)
            status, text = 0, repr(exc)
        if status != 400 or field not in text or any(m in text for m in TRACEBACK_MARKS):
            problems.append(f"{route} {name}: {status} {text[:300]}")
    running_after = server.gauge()
    streamer.join(120)
    assert not problems, "\n".join(problems)
    assert running_after >= 1, "the stream ended before the poisons were all sent: nothing was tested"

    # The stream that started before the poisons finished normally.
    assert "error" not in result, result["error"]
    chunks = result["chunks"]
    assert chunks[-1].usage.completion_tokens == max_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    # And every route still serves.
    for route, call in ROUTES.items():
        status, text = call(server, {"seed": 7})
        assert status == 200, f"{route}: {status} {text}"


@pytest.mark.parametrize("body, field", [
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"n": 2.0}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"temperature": "0.5"}, "temperature"),
    ({"seed": True}, "seed"),
    ({"n": MAX_N + 1}, "n"),
])
def test_openai_strict_types(server, body, field):
    for path, base in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": PROMPT})):
        r = httpx.post(server.url + path, json={"model": "tiny", **base, **body}, headers=AUTH, timeout=60)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"])
def test_non_finite_floats_are_400(server, field, value):
    # Python's json writes inf and nan as Infinity and NaN, as a client's JSON library might.
    chat = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 2, field: float(value)})
    r = httpx.post(server.url + "/v1/chat/completions", content=chat,
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    gen = json.dumps({"text_input": PROMPT, "parameters": {"max_tokens": 2, field: float(value)}})
    r = httpx.post(server.url + "/v2/models/tiny/generate", content=gen,
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and field in r.json()["error"], r.text


# -- the shared validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 2**64 - 1, "n": 2}, "seed"),
    ({"seed": 2**64 - 3, "n": 4}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"n": MAX_N + 1}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 10.0}, "max_tokens"),
    ({"min_tokens": False}, "min_tokens"),
    ({"logprobs": True}, "logprobs"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"min_p": math.nan}, "min_p"),
    ({"presence_penalty": math.inf}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"stop_token_ids": [2**63]}, "stop_token_ids"),
])
def test_sampling_params_reject(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"seed": -(2**63)}, {"seed": 2**64 - 1}, {"seed": 2**64 - 4, "n": 4}, {"seed": -1, "n": 3},
    {"top_k": 2**63 - 1}, {"top_k": -1}, {"n": MAX_N}, {"temperature": 0}, {"max_tokens": None},
])
def test_sampling_params_accept_the_edges(kwargs):
    params = SamplingParams(**kwargs)
    # Every child's seed seeds a generator (what the engine core does when it takes the request).
    sampler = Sampler(torch.device("cpu"), 0)
    for i in range(params.n):
        child = params.for_child(i)
        if child.seed is not None:
            sampler.make_generator(child.seed)


def test_sampler_clamps_a_huge_top_k_to_the_vocabulary():
    from engine.sampler import _top_k_top_p

    logits = torch.randn(2, 10)
    out = _top_k_top_p(logits, [2**64, 3], [1.0, 1.0])  # even past int64 (SamplingParams bounds it)
    assert torch.equal(out[0], logits[0])  # top_k past the vocabulary: nothing masked
    assert int(torch.isfinite(out[1]).sum()) == 3


# -- the engine core survives a failing request ------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny_qwen2):
    return LLM(model=str(tiny_qwen2), dtype="float32", device="cpu", max_model_len=256)


def _request(llm, rid: str, max_tokens: int, **params: Any) -> EngineRequest:
    sp = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, **params)
    return EngineRequest(rid, llm.get_tokenizer()(PROMPT).input_ids, sp)


def _finished(outputs: list[Any]) -> dict[str, str]:
    return {o.request_id: o.finish_reason for o in outputs if o.finish_reason is not None}


def test_a_seed_that_cannot_seed_a_generator_fails_only_its_request(llm, monkeypatch):
    # A seed the validation let through but torch refuses: the request fails when it is added
    # (a 400 for the front end), never inside a step that holds other requests.
    core = llm.core
    real = core.runner.sampler.make_generator

    def make_generator(seed: int) -> torch.Generator:
        if seed == 666:
            return real(2**70)  # what torch does with a seed out of its range
        return real(seed)

    monkeypatch.setattr(core.runner.sampler, "make_generator", make_generator)
    core.add_request(_request(llm, "ok", 6, seed=1))
    core.step()
    with pytest.raises(ValueError, match="^seed:"):
        core.add_request(_request(llm, "bad", 6, seed=666))
    finished: dict[str, str] = {}
    for _ in range(50):
        if not core.has_unfinished():
            break
        finished.update(_finished(core.step()))
    assert finished == {"ok": "length"}


def test_core_loop_fails_the_requests_of_a_failing_step_and_keeps_serving(llm, monkeypatch):
    core = llm.core
    real_launch = core.runner.launch

    def launch(out, prev=None):
        if any(req.request_id == "poison" for req, _ in out.scheduled):
            raise RuntimeError("injected step failure (/some/path/file.py)")
        return real_launch(out, prev)

    monkeypatch.setattr(core.runner, "launch", launch)
    parent, child = Pipe()
    loop = threading.Thread(target=serve_core, args=(core, child), daemon=True)
    loop.start()
    send_msg(parent, ("add", _request(llm, "poison", 4)))
    failed = _until(parent, lambda m: m[0] == "failed")
    assert failed[1] == "poison" and "/some/path" not in failed[2]
    assert not core.scheduler.requests  # its KV blocks are free again
    send_msg(parent, ("add", _request(llm, "after", 4, seed=5)))
    done = _until(parent, lambda m: m[0] == "outputs" and "after" in _finished(m[1]))
    assert _finished(done[1])["after"] == "length"
    send_msg(parent, ("shutdown",))
    loop.join(30)
    assert not loop.is_alive()
    assert core.block_manager.usage() == 0.0


def test_offline_generate_raises_a_failing_step_and_serves_the_next_call(llm, monkeypatch):
    real_launch = llm.core.runner.launch
    calls = {"n": 0}

    def launch(out, prev=None):
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step of both prompts
            raise RuntimeError("injected step failure")
        return real_launch(out, prev)

    monkeypatch.setattr(llm.core.runner, "launch", launch)
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=1)
    with pytest.raises(StepError) as err:
        llm.generate([PROMPT, "Hello"], params, use_tqdm=False)
    assert isinstance(err.value.__cause__, RuntimeError) and len(err.value.request_ids) == 2
    assert not llm.core.has_unfinished()
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 8


def _until(conn, want, timeout: float = 60.0) -> tuple:
    while conn.poll(timeout):
        msg = recv_msg(conn)
        assert msg[0] != "fatal", msg
        if want(msg):
            return msg
    raise AssertionError("the core loop sent nothing within the timeout")


# -- 500s carry a short message and an id, never a traceback ------------------------------------------------
def test_internal_errors_hide_their_details():
    from runtime.openai_routes import _internal_error
    from runtime.v2_routes import _internal

    exc = RuntimeError('engine core died:\nTraceback (most recent call last):\n  File "/x/engine/core.py", line 3')
    err = _internal_error(exc)
    assert err.status == 500 and "Traceback" not in err.message and "/x/" not in err.message
    assert "request id" in err.message
    v2 = _internal(exc)
    assert v2.status == 500 and "Traceback" not in v2.message and "request id" in v2.message
