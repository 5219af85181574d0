"""Server pieces that need no running server: flags, API-key paths, dataplane errors."""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import pytest

from engine import EngineArgs
from runtime.args import (
    DEFAULT_IMAGES_PER_PROMPT,
    engine_args_from,
    frontend_args_from,
    normalize_argv,
    parse_limit_mm_per_prompt,
)
from runtime.auth import needs_api_key
from runtime.serve import add_serve_args


def _parse(*argv: str) -> argparse.Namespace:
    parser = add_serve_args(argparse.ArgumentParser())
    return parser.parse_args(normalize_argv(list(argv), parser))


def test_serve_defaults_and_engine_args(tmp_path):
    ns = _parse("some/model")
    assert (ns.model, ns.host, ns.port, ns.grpc_port) == ("some/model", "0.0.0.0", 8000, 8081)
    ea = engine_args_from(ns)
    # The server's default image limit (vLLM v1's 999 is no bound); a given spec keeps it for images.
    assert ea == EngineArgs(model="some/model", task="generate",
                            limit_mm_per_prompt={"image": DEFAULT_IMAGES_PER_PROMPT})
    assert engine_args_from(_parse("m", "--limit-mm-per-prompt", "video=1")).limit_mm_per_prompt == {
        "image": DEFAULT_IMAGES_PER_PROMPT, "video": 1}

    ns = _parse("m", "--dtype", "bfloat16", "--max_model_len", "512", "--max-num-seqs", "8", "--block-size", "32",
                "--no-enable-prefix-caching", "--seed", "7", "--trust-remote-code", "--served-model-name", "a", "b",
                "--limit-mm-per-prompt", '{"image": 2}', "--allowed-media-domains", "x.org,y.org", "z.org",
                "--allowed-local-media-path", str(tmp_path), "--task", "embedding", "--max-num-batched-tokens", "64")
    ea = engine_args_from(ns)
    assert (ea.dtype, ea.max_model_len, ea.max_num_seqs, ea.block_size, ea.enable_prefix_caching, ea.seed) == (
        "bfloat16", 512, 8, 32, False, 7)
    assert ea.trust_remote_code and ea.served_model_name == "a" and ea.max_num_batched_tokens == 64
    assert ea.limit_mm_per_prompt == {"image": 2} and ea.allowed_media_domains == ["x.org", "y.org", "z.org"]
    assert ea.allowed_local_media_path == str(tmp_path) and ea.task == "embedding"
    fe = frontend_args_from(ns)
    assert fe.served_model_names == ["a", "b"] and fe.task == "embedding"


def test_limit_mm_per_prompt_forms():
    assert parse_limit_mm_per_prompt("image=2,video=1") == {"image": 2, "video": 1}
    assert parse_limit_mm_per_prompt('{"image": 3}') == {"image": 3}
    for bad in ("image=-1", "audio=1", "image", '{"image": 1.5}', '["image"]', "image=1,image=2", "{bad"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_limit_mm_per_prompt(bad)
    with pytest.raises(SystemExit):
        _parse("m", "--limit-mm-per-prompt", "image=x")


def test_bad_flags_exit():
    for argv in (("m", "--dtype", "int3"), ("m", "--gpu-memory-utilization", "1.5"), ("m", "--max-model-len", "0"),
                 ("m", "--task", "rerank")):
        with pytest.raises(SystemExit):
            _parse(*argv)
    with pytest.raises(ValueError, match="block_size"):
        engine_args_from(_parse("m", "--block-size", "24"))
    with pytest.raises(ValueError, match="chat-template"):
        frontend_args_from(_parse("m", "--chat-template", "/no/such/file.jinja"))


def test_chat_template_and_api_key(tmp_path, monkeypatch):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}")
    monkeypatch.setenv("VLMSERVE_API_KEY", "from-env")
    fe = frontend_args_from(_parse("m", "--chat-template", str(path)))
    assert fe.chat_template == "{{ messages[0]['content'] }}" and fe.api_key == "from-env"
    assert frontend_args_from(_parse("m", "--api-key", "flag")).api_key == "flag"
    monkeypatch.delenv("VLMSERVE_API_KEY")
    assert frontend_args_from(_parse("m")).api_key is None


def test_kserve_form_parses_both_spellings():
    from runtime.__main__ import build_parser

    parser = build_parser()
    ns = parser.parse_args(normalize_argv(["--model_name=m", "--model_dir=/x", "--http_port", "9", "--max_num_seqs",
                                           "4", "--enable_grpc", "false"], parser))
    assert (ns.model_name, ns.model_dir, ns.http_port, ns.max_num_seqs, ns.enable_grpc) == ("m", "/x", 9, 4, False)


def test_api_key_paths():
    for path in ("/v1/chat/completions", "/openai/v1/models", "/v2/models/m/infer", "/v2/models/m", "/v2"):
        assert needs_api_key(path), path
    for path in ("/", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2/models/m/ready", "/docs"):
        assert not needs_api_key(path), path


def _dataplane_with(model_ready: bool, chat_template: str | None):
    from runtime._kserve import kserve
    from runtime.model import VLMModel
    from runtime.openai_dataplane import OpenAIDataPlane

    model = VLMModel("m", EngineArgs(model="x"))
    model.llm = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=chat_template), is_running=True,
                                config=SimpleNamespace(scheduler=SimpleNamespace(max_model_len=64)))
    model.ready = model_ready
    registry = kserve.ModelRepository()
    registry.update(model)
    return OpenAIDataPlane(registry)


def _chat_error(dp, **kw):
    from runtime.openai_dataplane import OpenAIError
    from runtime.openai_protocol import ChatCompletionRequest

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)
    with pytest.raises(OpenAIError) as err:
        asyncio.run(dp.create_chat_completion(req))
    return err.value


def test_dataplane_errors():
    err = _chat_error(_dataplane_with(True, None), model="m")
    assert err.status == 400 and "chat template" in err.message and err.code == "chat_template_missing"
    err = _chat_error(_dataplane_with(False, "t"), model="m")
    assert err.status == 503 and "not ready" in err.message
    err = _chat_error(_dataplane_with(True, "t"), model="other")
    assert err.status == 404 and "other" in err.message and err.code == "model_not_found"
    err = _chat_error(_dataplane_with(True, "t"), model="m", top_p=0)
    assert err.status == 400 and err.param == "top_p"
    err = _chat_error(_dataplane_with(True, "t"), model="m", logit_bias={"1": 2.0})
    assert err.status == 400 and err.param == "logit_bias"


# -- vLLM's flags, as deployment manifests pass them (issue 17) ---------------------------------
VLLM_FLAGS = ["--runner", "generate", "-tp", "1", "--disable-log-requests", "--uvicorn-log-level", "warning",
              "--root-path", "/models/tiny", "--ssl-keyfile", "/k.pem", "--ssl-certfile", "/c.pem",
              "--allowed-origins", '["https://ui.example"]']


def _kserve_form(*argv: str) -> argparse.Namespace:
    from runtime.__main__ import build_parser, parse_args

    return parse_args(build_parser(), list(argv))


def test_vllm_manifest_flags_are_accepted():
    ns = _kserve_form("--model", "/models/qwen", *VLLM_FLAGS)
    assert ns.model_dir == "/models/qwen" and ns.model_name == "/models/qwen"  # vLLM serves it under its path
    assert (ns.task, ns.tensor_parallel_size, ns.uvicorn_log_level, ns.root_path) == ("generate", 1, "warning",
                                                                                        "/models/tiny")
    assert (ns.ssl_keyfile, ns.ssl_certfile, ns.allowed_origins) == ("/k.pem", "/c.pem", ["https://ui.example"])
    assert _kserve_form("--model_name=m", "--model", "/x", "--allowed_origins", "a.org,b.org").allowed_origins == [
        "a.org", "b.org"]
    assert _kserve_form("--model_dir", "/x", "--served-model-name", "q").model_name == "q"
    assert _kserve_form("--model_dir", "/x").model_name == "model"  # KServe's default
    assert _kserve_form("--model", "/x", "--runner", "pooling").task == "embedding"
    ns = _parse("m", *VLLM_FLAGS)  # `vlmserve serve` takes them too
    assert (ns.ssl_keyfile, ns.root_path, ns.allowed_origins) == ("/k.pem", "/models/tiny", ["https://ui.example"])
    assert _parse("--model", "m2").vllm_model == "m2"  # run_serve takes it as MODEL


@pytest.mark.parametrize("argv, words", [
    (("-tp", "2"), ["--tensor-parallel-size 2", "one device"]),
    (("--tensor-parallel-size=4",), ["--tensor-parallel-size 4", "replicas"]),
    (("--runner", "draft"), ["--runner draft"]),
])
def test_vllm_values_we_cannot_honour_are_refused_clearly(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_:
        _kserve_form("--model_dir", "/x", *argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and all(w in err for w in words), err


def test_every_flag_takes_both_spellings():
    from runtime.__main__ import build_parser

    parser = build_parser()
    actions = parser._option_string_actions
    for option, action in actions.items():
        if not option.startswith("--") or option == "--help":
            continue
        for spelling in ("--" + option[2:].replace("-", "_"), "--" + option[2:].replace("_", "-")):
            assert actions.get(normalize_argv([spelling + "=1"], parser)[0].split("=")[0]) is action, (option, spelling)


def test_api_key_paths_under_a_root_path():
    from runtime.auth import route_path

    # uvicorn (>= 0.26) puts --root-path in front of the path; the key check must still see /v1.
    assert route_path({"path": "/ml/demo/v1/models", "root_path": "/ml/demo"}) == "/v1/models"
    assert route_path({"path": "/ml/demo", "root_path": "/ml/demo/"}) == "/"
    assert route_path({"path": "/ml/demonstration/v1", "root_path": "/ml/demo"}) == "/ml/demonstration/v1"
    assert route_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"
    assert needs_api_key(route_path({"path": "/p/v2/models/m/infer", "root_path": "/p"}))


@pytest.mark.parametrize("argv, count", [
    (["m", "--api-server-count", "3"], 3), (["--api_server_count=4"], 4), (["--api-server-count=2", "--port", "1"], 2),
    (["m"], 1), (["--api-server-count"], 1), (["--api-server-count", "x"], 1)])
def test_api_server_count_is_read_before_the_parser(argv, count) -> None:
    """Multiprocess metrics are switched on from the raw command line, before prometheus_client is
    imported (runtime.metrics_multiprocess): it must read the flag as the parser does."""
    from runtime.metrics_multiprocess import api_server_count

    assert api_server_count(argv) == count


def test_mm_processor_kwargs_use_fast():
    """vLLM's --mm-processor-kwargs: use_fast picks HF's fast or PIL image processor arithmetic."""
    assert engine_args_from(_parse("m")).mm_processor_kwargs is None  # HF's own choice
    for text, want in (('{"use_fast": false}', {"use_fast": False}), ('{"use_fast": true}', {"use_fast": True}),
                       ("{}", {})):
        assert engine_args_from(_parse("m", "--mm-processor-kwargs", text)).mm_processor_kwargs == want
    assert engine_args_from(_parse("m", "--mm_processor_kwargs", '{"use_fast": false}')).mm_processor_kwargs == {
        "use_fast": False}
    for bad in ('{"use_fast": "no"}', '{"min_pixels": 3136}', "[1]", "{bad"):
        with pytest.raises(SystemExit):
            _parse("m", "--mm-processor-kwargs", bad)
    for bad, words in (({"use_fast": 1}, "use_fast must be true or false"),
                       ({"max_pixels": 10}, "unsupported key"), ("fast", "expected an object")):
        with pytest.raises(ValueError, match=f"mm_processor_kwargs: .*{words}"):
            EngineArgs(model="m", mm_processor_kwargs=bad).validate()
