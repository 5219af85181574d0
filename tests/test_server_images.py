"""Images through the real server (``python -m runtime`` serving the tiny Qwen2-VL, a subprocess on
free ports) with the official ``openai`` client: data URLs, two images, file:// under
``--allowed-local-media-path``, http(s) from a local server, streaming, usage counting the image
tokens, and every way an image request can be wrong (each a 4xx OpenAI error naming the problem,
after which the server still answers). The image host is on 127.0.0.1, so the server runs with
--allow-private-media-urls."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import time
from pathlib import Path
from typing import ClassVar

import httpx
import openai
import pytest
import tiny_vlm
from server_harness import ServerProcess, running, server_env

from engine import LLM, SamplingParams

MAX_MODEL_LEN = 1024
FETCH_TIMEOUT_S = 1
SLOW_SERVER_SLEEP_S = 6


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


class Server(ServerProcess):
    """``python -m runtime`` serving the tiny Qwen2-VL (no API key, no proxy for 127.0.0.1)."""

    def __init__(self, model_dir: Path, log_path: Path, extra: list[str], env: dict[str, str]) -> None:
        args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", str(MAX_MODEL_LEN), *extra]
        no_proxy = "127.0.0.1,localhost"
        super().__init__(model_dir, log_path, "tiny-vl", args, server_env(**env, NO_PROXY=no_proxy, no_proxy=no_proxy))


class ImageHandler(http.server.BaseHTTPRequestHandler):
    images: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(SLOW_SERVER_SLEEP_S)  # longer than the server's fetch timeout
        body = self.images.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def images():
    return {name: tiny_vlm.random_image(h, w, seed) for name, (h, w, seed) in
            {"a": (112, 112, 1), "b": (84, 140, 2), "c": (56, 56, 3)}.items()}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory, images):
    d = tmp_path_factory.mktemp("media")
    (d / "a.png").write_bytes(png_bytes(images["a"]))
    with open(d / "huge.png", "wb") as f:  # sparse: 21 MiB on paper, nothing on disk
        f.truncate(21 * 1024 * 1024)
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes(png_bytes(images["b"]))
    (d / "link.png").symlink_to(outside)  # inside by name, outside once resolved
    return d


@pytest.fixture(scope="module")
def image_server(images):
    ImageHandler.images = {"/a.png": png_bytes(images["a"]), "/slow.png": png_bytes(images["a"])}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl_server"), seed=0)


@pytest.fixture(scope="module")
def server(vlm_dir, media_dir, tmp_path_factory):
    srv = Server(vlm_dir, tmp_path_factory.mktemp("server") / "server.log",
                 ["--limit-mm-per-prompt", "image=2", "--allowed-local-media-path", str(media_dir),
                  "--allow-private-media-urls"],
                 {"VLLM_IMAGE_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S)})
    # The offline reference loads while the server starts.
    with running(srv, lambda: LLM(model=str(vlm_dir), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN,
                                  limit_mm_per_prompt={"image": 2}, allowed_local_media_path=str(media_dir))):
        yield srv


@pytest.fixture(scope="module")
def offline(server):
    return server.offline


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _ask(client, messages, max_tokens: int = 12, **kw):
    return client.chat.completions.create(model="tiny-vl", messages=messages, temperature=0, max_tokens=max_tokens,
                                          **kw)


def _offline(offline, messages, max_tokens: int = 12):
    return offline.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0]


def _num_image_tokens(offline, ids: list[int]) -> int:
    return ids.count(offline.tokenizer.convert_tokens_to_ids("<|image_pad|>"))


def test_one_image_data_url_matches_offline(client, offline, images):
    messages = user(image_part(data_url(png_bytes(images["a"]))))
    ref = _offline(offline, messages)
    r = _ask(client, messages)
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    # usage counts the image's placeholder tokens: 112x112 -> 8x8 patches -> 16 merged tokens.
    assert _num_image_tokens(offline, ref.prompt_token_ids) == 16
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    text_only = _ask(client, [{"role": "user", "content": "What is in the picture?"}], max_tokens=1)
    assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 16


def test_two_images_match_offline(client, offline, images):
    messages = user(image_part(data_url(png_bytes(images["a"]))), image_part(data_url(png_bytes(images["b"]))),
                    text="Compare the two pictures.")
    ref = _offline(offline, messages)
    r = _ask(client, messages)
    assert r.choices[0].message.content == ref.outputs[0].text
    assert _num_image_tokens(offline, ref.prompt_token_ids) == 16 + 15  # 84x140 -> 6x10 patches -> 15
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    # In the other order too (each image keeps its own placeholder run and M-RoPE positions).
    swapped = [{"role": "user", "content": [messages[0]["content"][1], messages[0]["content"][0],
                                            messages[0]["content"][2]]}]
    assert _ask(client, swapped).choices[0].message.content == _offline(offline, swapped).outputs[0].text


def test_file_and_http_urls_equal_data_url(client, offline, images, media_dir, image_server):
    expected = _offline(offline, user(image_part(data_url(png_bytes(images["a"])))))
    for url in (f"file://{media_dir / 'a.png'}", f"{image_server}/a.png"):
        r = _ask(client, user(image_part(url)))
        assert r.choices[0].message.content == expected.outputs[0].text, url
        assert r.usage.prompt_tokens == len(expected.prompt_token_ids), url


def test_stream_with_image_equals_non_stream(client, images):
    messages = user(image_part(data_url(png_bytes(images["b"]))))
    full = _ask(client, messages, max_tokens=20)
    text, finishes, usage = "", [], None
    for chunk in _ask(client, messages, max_tokens=20, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finishes += [c.finish_reason] if c.finish_reason else []
    assert text == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)


def _post(server, body) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.url}/v1/chat/completions", content=content,
                      headers={"Content-Type": "application/json"}, timeout=60)


def _check(resp: httpx.Response, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    for w in words:
        assert w.lower() in err["message"].lower(), err
    return err


def _fit_text(offline, parts: list[dict], target: int) -> list[dict]:
    """A user message with ``parts`` and "sea sea ..." whose templated prompt is ``target`` tokens
    long before the image placeholders are expanded (one placeholder token per image)."""
    def length(n: int) -> int:
        p = offline.processor.chat_prompt(user(*parts, text="sea " * n), offline.media_loader)
        return len(p["prompt_token_ids"])

    n = target - length(0)
    while length(n) > target:
        n -= 1
    assert target - 5 <= length(n) <= target
    return user(*parts, text="sea " * n)


def test_bad_images_and_requests_get_4xx_and_server_keeps_serving(server, client, offline, images, media_dir):
    good = png_bytes(images["c"])
    chat = lambda parts: {"model": "tiny-vl", "max_tokens": 4, "messages": user(*parts)}

    def still_serving() -> None:
        r = _ask(client, user(image_part(data_url(good))), max_tokens=2)
        assert r.usage.completion_tokens == 2

    big = io.BytesIO()
    from PIL import Image

    Image.new("1", (9000, 9000)).save(big, format="PNG")  # 81 Mpixels, a few KiB as a 1-bit PNG
    two = [image_part(data_url(png_bytes(images["a"]))), image_part(data_url(png_bytes(images["b"])))]
    long_with_images = _fit_text(offline, two, MAX_MODEL_LEN - 10)
    cases = [
        # (body, status, words the message must contain, param)
        ({"model": "tiny-vl", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": data_url(good)}, {"type": "text", "text": "hi"}]}]},
         400, ["image_url", "bare string"], "messages"),
        (chat([image_part("data:image/png;base64,@@not-base64@@")]), 400, ["base64"], None),
        (chat([image_part(data_url(good[: len(good) // 2]))]), 400, ["cannot decode image"], None),
        (chat([image_part(data_url(good))] * 3), 400, ["3 images", "at most 2"], "messages"),
        (chat([image_part(data_url(big.getvalue()))]), 413, ["9000x9000", "exceeds"], None),
        (chat([image_part(f"file://{media_dir / 'huge.png'}")]), 413, ["exceeds the limit"], None),
        (chat([image_part(f"file://{media_dir / 'link.png'}")]), 400, ["outside the allowed"], None),
        (chat([image_part("file:///etc/hostname")]), 400, ["outside the allowed"], None),
        (chat([image_part(f"file://{media_dir / 'missing.png'}")]), 400, ["no such file"], None),
        (chat([image_part("ftp://127.0.0.1/a.png")]), 400, ["unsupported URL scheme", "ftp"], None),
        ({**chat([image_part(data_url(good))]), "model": "no-such-model"}, 404, ["no-such-model"], "model"),
        ({**chat([image_part(data_url(good))]), "max_tokens": -3}, 400, ["max_tokens"], "max_tokens"),
        ({"model": "tiny-vl", "messages": user(image_part(data_url(good)), text="sea " * 1500)}, 400,
         ["max_model_len", str(MAX_MODEL_LEN)], None),
        # The text fits; its two images' placeholder tokens (16 + 15) push it past max_model_len.
        ({"model": "tiny-vl", "messages": long_with_images}, 400, ["too long", "max_model_len"], "messages"),
        ('{"model": "tiny-vl", "messages": [', 400, ["JSON"], None),
    ]
    for body, status, words, param in cases:
        err = _check(_post(server, body), status, *words)
        if param is not None:
            assert err["param"] == param, err
        if "image_url" in words:
            assert "messages" in err["message"], err  # names where the bad part is
        still_serving()

    # The openai client surfaces the same errors as typed exceptions.
    with pytest.raises(openai.BadRequestError) as exc:
        _ask(client, user(image_part("ftp://example.com/x.png")))
    assert exc.value.status_code == 400 and "ftp" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=user(image_part(data_url(good))), max_tokens=2)
    still_serving()


def test_image_fetch_timeout_is_a_quick_4xx(server, client, image_server, images):
    t0 = time.monotonic()
    resp = _post(server, {"model": "tiny-vl", "max_tokens": 4, "messages": user(image_part(f"{image_server}/slow.png"))})
    elapsed = time.monotonic() - t0
    err = _check(resp, 400, "could not be fetched")  # the timeout itself is in the server log
    assert err["code"] == "invalid_media" and err["param"] == "messages"
    assert elapsed < FETCH_TIMEOUT_S + 2.5, elapsed  # VLLM_IMAGE_FETCH_TIMEOUT=1, not the 6 s the server sleeps
    r = _ask(client, user(image_part(data_url(png_bytes(images["c"])))), max_tokens=2)
    assert r.usage.completion_tokens == 2
