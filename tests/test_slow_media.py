"""Slow image hosts (issue 13): a fetch has one total deadline (connect, headers, body, every
redirect hop), and in the server hanging fetches never stall other requests.

Local HTTP servers on 127.0.0.1 play the hosts: one drips its headers a byte a second (each
socket read succeeds, so a per-operation timeout never trips), one accepts and never answers,
one redirects, one answers a body without Content-Length. The server tests run ``python -m
runtime`` on the tiny Qwen2-VL (as tests/test_server_images.py does). The hosts live on
127.0.0.1, so loaders and the server are opened to private addresses (--allow-private-media-urls).
Every fetch failure reads the same (tests/test_media_security.py); the reason is in
``MediaError.detail`` and in the log."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tiny_vlm
from server_harness import ServerProcess, running, server_env

from engine.media import MediaConfig, MediaError, MediaLoader

UNIT_TIMEOUT_S = 2.0
SERVER_TIMEOUT_S = 8
SLACK_S = 1.5
DRIP_S = 10  # how long a drip lasts by default; the server test asks for longer


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Hosts:
    """The slow and odd hosts, each a path of one threading HTTP server, plus a silent socket."""

    def __init__(self, image: bytes) -> None:
        self.stop = threading.Event()
        self.image = image
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.silent = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.silent_url = f"http://127.0.0.1:{self.silent.getsockname()[1]}/never.png"
        self._held: list[socket.socket] = []
        for target in (self.httpd.serve_forever, self._accept_and_hold):
            threading.Thread(target=target, daemon=True).start()

    def _accept_and_hold(self) -> None:
        """Accept every connection and never answer (the socket stays open until close())."""
        while not self.stop.is_set():
            try:
                conn, _ = self.silent.accept()
            except OSError:
                return
            self._held.append(conn)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hosts = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a deadline, a size limit), as it should

            def do_GET(self) -> None:
                self._route()

            def _route(self) -> None:
                if self.path.startswith("/drip"):
                    self._drip()
                elif self.path.startswith("/redirect-to/"):
                    self._redirect(self.path.removeprefix("/redirect-to/"))
                elif self.path.startswith("/chunked-big"):
                    self._chunked(b"\0" * 4096, repeat=16)
                elif self.path.startswith("/a.png"):
                    self._image()
                else:
                    self.send_error(404)

            def _drip(self) -> None:
                # A valid status line and then a header one byte a second, for ?s= seconds (so
                # that a client without a total deadline fails the test instead of hanging it).
                seconds = int(self.path.partition("?s=")[2] or DRIP_S)
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
                self.wfile.flush()
                for _ in range(seconds):
                    if hosts.stop.wait(1.0):
                        return
                    self.wfile.write(b"a")
                    self.wfile.flush()

            def _redirect(self, target: str) -> None:
                self.send_response(302)
                self.send_header("Location", target if "://" in target else "/" + target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _chunked(self, piece: bytes, repeat: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(repeat):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

            def _image(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(hosts.image)))
                self.end_headers()
                self.wfile.write(hosts.image)

            def log_message(self, *args) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.silent.close()
        for conn in self._held:
            conn.close()


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(tiny_vlm.random_image(56, 56, 3))


@pytest.fixture(scope="module")
def hosts(image) -> Iterator[Hosts]:
    h = Hosts(image)
    yield h
    h.close()


@pytest.fixture
def loader() -> MediaLoader:
    return opened(fetch_timeout=UNIT_TIMEOUT_S)


def opened(**kw) -> MediaLoader:
    return MediaLoader(MediaConfig(allow_private_media_urls=True, **kw))


def _timed_failure(fn, *words: str) -> float:
    """Seconds until ``fn`` raised a MediaError whose message or detail has every word."""
    t0 = time.monotonic()
    with pytest.raises(MediaError) as exc:
        fn()
    elapsed = time.monotonic() - t0
    text = f"{exc.value} | {exc.value.detail}"
    for w in words:
        assert w in text, text
    return elapsed


# -- the loader on its own (the offline path: LLM.chat) -------------------------------------------
def test_header_drip_fails_at_the_total_deadline(loader, hosts):
    elapsed = _timed_failure(lambda: loader.load_image(f"{hosts.url}/drip", "image_url"),
                             "image_url", f"timed out after {UNIT_TIMEOUT_S:g} s")
    assert UNIT_TIMEOUT_S - 0.2 < elapsed < UNIT_TIMEOUT_S + SLACK_S, elapsed


def test_timeout_from_the_environment(monkeypatch, hosts):
    monkeypatch.setenv("VLMSERVE_IMAGE_FETCH_TIMEOUT", "1")
    elapsed = _timed_failure(lambda: opened().load_image(f"{hosts.url}/drip"), "timed out after 1 s")
    assert elapsed < 1 + SLACK_S, elapsed


def test_silent_host_fails_at_the_deadline(loader, hosts):
    elapsed = _timed_failure(lambda: loader.load_image(hosts.silent_url), f"timed out after {UNIT_TIMEOUT_S:g} s")
    assert elapsed < UNIT_TIMEOUT_S + SLACK_S, elapsed


def test_deadline_covers_every_redirect_hop(loader, hosts):
    elapsed = _timed_failure(lambda: loader.load_image(f"{hosts.url}/redirect-to/redirect-to/drip"), "timed out")
    assert elapsed < UNIT_TIMEOUT_S + SLACK_S, elapsed


def test_redirects_are_followed_and_each_hop_is_checked(hosts, image):
    loader = opened(fetch_timeout=UNIT_TIMEOUT_S, allowed_media_domains=("127.0.0.1",))
    assert loader.load_image(f"{hosts.url}/redirect-to/a.png").size == (56, 56)
    # A hop to a domain off the allow-list is refused, not fetched.
    _timed_failure(lambda: loader.load_image(f"{hosts.url}/redirect-to/http://localhost:1/a.png"),
                   "'localhost'", "allowed-media-domains")
    _timed_failure(lambda: loader.load_image(f"{hosts.url}/redirect-to/ftp://127.0.0.1/a.png"), "scheme")


def test_max_bytes_holds_without_content_length(hosts):
    loader = opened(fetch_timeout=UNIT_TIMEOUT_S, max_bytes=10_000)
    with pytest.raises(MediaError) as exc:
        loader.load_image(f"{hosts.url}/chunked-big")
    # A download over the limit reads as any fetch failure (a 413 would tell that a host answered).
    assert exc.value.status == 400 and "exceeds the limit" in exc.value.detail


def test_http_errors_are_media_errors(loader, hosts):
    with pytest.raises(MediaError) as exc:
        loader.load_image(f"{hosts.url}/missing.png", "image_url")
    assert exc.value.status == 400 and "could not be fetched" in str(exc.value) and "404" in exc.value.detail


def test_sync_fetch_inside_a_running_event_loop(loader, hosts):
    """LLM.chat called from async code (a notebook) still fetches, with the same deadline."""
    async def main() -> tuple[tuple[int, int], float]:
        size = loader.load_image(f"{hosts.url}/a.png").size
        return size, _timed_failure(lambda: loader.load_image(f"{hosts.url}/drip"), "timed out")

    size, elapsed = asyncio.run(main())
    assert size == (56, 56) and elapsed < UNIT_TIMEOUT_S + SLACK_S


def test_concurrent_sync_fetches_each_keep_their_deadline(loader, hosts):
    with ThreadPoolExecutor(6) as pool:
        t0 = time.monotonic()
        futures = [pool.submit(loader.load_image, url) for url in [f"{hosts.url}/drip", hosts.silent_url] * 3]
        errors = [f.exception() for f in futures]
    assert all(isinstance(e, MediaError) and "timed out" in e.detail for e in errors), errors
    assert time.monotonic() - t0 < UNIT_TIMEOUT_S + SLACK_S


def test_fetch_all_fails_fast_and_names_the_part(loader, hosts):
    refs = [(f"{hosts.url}/drip", "messages[0].content[0].image_url"),
            (f"{hosts.url}/a.png", "messages[0].content[1].image_url"),
            (f"{hosts.url}/a.png", "messages[0].content[2].image_url"),
            (f"{hosts.url}/missing.png", "messages[0].content[3].image_url")]
    elapsed = _timed_failure(lambda: asyncio.run(loader.fetch_all_async(refs)), "content[3]", "404")
    assert elapsed < 1.0, elapsed  # the drip is cancelled, not waited for
    fetched = asyncio.run(loader.fetch_all_async(refs[1:3]))
    assert list(fetched) == [f"{hosts.url}/a.png"]  # one fetch per URL
    assert loader.with_prefetched(fetched).load_image(f"{hosts.url}/a.png").size == (56, 56)


def test_remote_image_urls_name_parts_as_parse_chat_does():
    from engine.chat import remote_image_urls

    part = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    messages = [{"role": "system", "content": "hi"},
                {"role": "user", "content": [part("data:image/png;base64,AA=="), {"type": "text", "text": "x"},
                                             part("HTTPS://h/a.png"), {"type": "image_url", "image_url": "bare"},
                                             part("http://h/b.png")]}]
    assert remote_image_urls(messages) == [("HTTPS://h/a.png", "messages[1].content[2].image_url"),
                                           ("http://h/b.png", "messages[1].content[4].image_url")]
    assert remote_image_urls("not a list") == []


# -- the real server: hanging fetches hold no one up ------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    vlm_dir = tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl_slow"), seed=0)
    no_proxy = "127.0.0.1,localhost"
    env = server_env(VLMSERVE_IMAGE_FETCH_TIMEOUT=str(SERVER_TIMEOUT_S), NO_PROXY=no_proxy, no_proxy=no_proxy)
    args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", "1024", "--allow-private-media-urls"]
    srv = ServerProcess(vlm_dir, tmp_path_factory.mktemp("server") / "server.log", "tiny-vl", args, env)
    with running(srv):
        yield srv


def _chat(server: ServerProcess, content, timeout: float = SERVER_TIMEOUT_S + 5) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    resp = httpx.post(f"{server.url}/v1/chat/completions", timeout=timeout, json={
        "model": "tiny-vl", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": content}]})
    return resp, time.monotonic() - t0


def _with_image(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]


def test_hanging_fetches_do_not_stall_other_requests(server, hosts, image):
    _chat(server, "warm up")
    # More hanging requests than the server has prompt workers (at most 8), half of each kind.
    hanging = [hosts.silent_url, f"{hosts.url}/drip?s={3 * SERVER_TIMEOUT_S}"] * 5
    with ThreadPoolExecutor(len(hanging)) as pool:
        t0 = time.monotonic()
        stuck = [pool.submit(_chat, server, _with_image(url)) for url in hanging]
        time.sleep(1.0)  # the fetches are under way
        # A short client timeout: before the fix these waited behind the fetches (or forever).
        text, text_s = _chat(server, "Say hi.", timeout=5)
        data_url = "data:image/png;base64," + base64.b64encode(image).decode()
        with_image, image_s = _chat(server, _with_image(data_url), timeout=5)
        assert not any(f.done() for f in stuck), "the hanging requests should still be pending"
        results = [f.result() for f in stuck]
        total_s = time.monotonic() - t0
    assert text.status_code == 200 and with_image.status_code == 200, (text.text, with_image.text)
    assert text_s < 3 and image_s < 3, (text_s, image_s)  # not the 8 s fetch timeout
    for resp, _ in results:
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "invalid_media"
        assert "the image could not be fetched" in resp.json()["error"]["message"]
    assert server.log_path.read_text().count(f"timed out after {SERVER_TIMEOUT_S} s") >= len(hanging)  # logged
    assert total_s < SERVER_TIMEOUT_S + 1.0 + 2 * SLACK_S, total_s  # every one at its own deadline
