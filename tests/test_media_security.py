"""SSRF and network exposure (issue 13): what the image loader refuses to fetch, what its errors
tell, where the servers listen and what error bodies and model cards show.

* Loopback, private, link-local, unspecified, multicast and metadata addresses are refused by
  default in any spelling, decided on the resolved addresses before any connection, at every
  redirect hop; the connection goes to the address that was checked (no DNS rebind).
  ``--allow-private-media-urls`` / ``$VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS`` open them.
* Every fetch failure after the policy checks reads the same (a closed port, a silent one, a
  non-image answer, an HTTP status): the server is no port scanner. The detail goes to the log.
* Both servers bind ``--host``; error bodies carry no paths or memory addresses; the model card's
  ``root`` is the served name.

Unit tests drive ``engine.media.MediaLoader`` against local HTTP servers; the server tests run
``python -m runtime`` on the tiny Qwen2-VL with the ``openai`` client. In unit tests, where every
test host is on 127.0.0.1, ``as_public`` makes 127.0.0.1 stand in for a public address and
``fake_dns`` maps made-up names to addresses.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import tiny_vlm
from server_harness import ServerProcess, free_port, running, server_env

from engine import EngineArgs
from engine import media
from engine.media import MediaConfig, MediaError, MediaLoader

ALLOW_ENV = "VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS"
TIMEOUT_S = 1.0
FETCH_FAILED = "the image could not be fetched"
REFUSED = "--allow-private-media-urls"


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def same_message(msg: str) -> str:
    """The message without its error id (which differs on every failure, telling nothing)."""
    return re.sub(r"error id [0-9a-f]+", "error id ID", msg)


class Host:
    """An image host on 127.0.0.1 that records every request (path and Host header), plus a
    socket that accepts and never answers, and one that records whether anyone connected."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.requests: list[tuple[str, str]] = []
        self.user_agents: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.silent = socket.create_server(("127.0.0.1", 0))
        self.silent_url = f"http://127.0.0.1:{self.silent.getsockname()[1]}/a.png"
        self.ftp = socket.create_server(("127.0.0.1", 0))  # stands for an FTP server
        self.ftp_port = self.ftp.getsockname()[1]
        self.ftp_connections = 0
        self._held: list[socket.socket] = []
        for target in (self.httpd.serve_forever, self._hold, self._count_ftp):
            threading.Thread(target=target, daemon=True).start()

    def _hold(self) -> None:
        while True:
            try:
                self._held.append(self.silent.accept()[0])
            except OSError:
                return

    def _count_ftp(self) -> None:
        while True:
            try:
                conn, _ = self.ftp.accept()
            except OSError:
                return
            self.ftp_connections += 1
            conn.close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests.append((self.path, self.headers.get("Host", "")))
                host.user_agents.append(self.headers.get("User-Agent", ""))
                if self.path.startswith("/redirect-to/"):
                    target = self.path.removeprefix("/redirect-to/")
                    self._answer(302, b"", {"Location": target if "://" in target else "/" + target})
                elif self.path == "/loop":
                    self._answer(302, b"", {"Location": "/loop"})
                elif self.path == "/a.png":
                    self._answer(200, host.image, {"Content-Type": "image/png"})
                elif self.path == "/text":
                    self._answer(200, b"<html>not an image</html>", {"Content-Type": "text/html"})
                elif self.path == "/big":
                    self._answer(200, b"\0" * 50_000, {"Content-Type": "image/png"})
                elif self.path == "/error":
                    self._answer(500, b"oops", {})
                else:
                    self._answer(404, b"no", {})

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    for k, v in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for s in (self.silent, self.ftp, *self._held):
            s.close()


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(tiny_vlm.random_image(56, 56, 3))


@pytest.fixture(scope="module")
def host(image) -> Iterator[Host]:
    h = Host(image)
    yield h
    h.close()


@pytest.fixture(autouse=True)
def _fresh(host, monkeypatch) -> None:
    host.requests.clear()
    monkeypatch.delenv(ALLOW_ENV, raising=False)


@pytest.fixture
def as_public(monkeypatch) -> None:
    """127.0.0.1 passes the address check as a public address would (the test hosts live there)."""
    real = media.address_refusal
    monkeypatch.setattr(media, "address_refusal", lambda ip: None if ip == "127.0.0.1" else real(ip))


@pytest.fixture
def fake_dns(monkeypatch) -> dict[str, list[list[str]]]:
    """``names[host]``: the answers to successive look-ups of ``host`` (the last one repeats);
    other names resolve for real. ``names["calls"]`` counts the fake look-ups."""
    names: dict[str, list[list[str]]] = {"calls": []}
    real = media.resolve_host

    async def resolve(host: str, port: int) -> list[str]:
        answers = names.get(host)
        if answers is None:
            return await real(host, port)
        names["calls"].append([host])
        return answers.pop(0) if len(answers) > 1 else answers[0]

    monkeypatch.setattr(media, "resolve_host", resolve)
    return names


def loader(**kw) -> MediaLoader:
    return MediaLoader(MediaConfig(fetch_timeout=TIMEOUT_S, **kw))


def failure(load, url: str) -> MediaError:
    with pytest.raises(MediaError) as exc:
        load.load_image(url, "image_url")
    return exc.value


# -- refused addresses, in any spelling -----------------------------------------------------------
LOOPBACK_SPELLINGS = ["127.0.0.1", "2130706433", "0x7f000001", "127.1", "0.0.0.0", "localhost", "LocalHost",
                      "[::1]", "[::ffff:127.0.0.1]", "[::]"]


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_loopback_in_any_spelling_is_refused_before_connecting(host, spelling):
    err = failure(loader(), f"http://{spelling}:{host.port}/a.png")
    assert err.status == 400 and str(err).startswith("image_url: ") and REFUSED in str(err), str(err)
    assert host.requests == []


NON_PUBLIC = ["10.1.2.3", "172.16.5.4", "192.168.0.1", "169.254.169.254", "[fd00:ec2::254]", "[fc00::1]",
              "[fe80::1]", "224.0.0.1", "[ff02::1]", "100.64.0.1", "255.255.255.255", "[2002:7f00:1::]",
              "[64:ff9b::a00:1]", "metadata.internal.test"]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_private_link_local_multicast_and_metadata_are_refused(address, fake_dns):
    fake_dns["metadata.internal.test"] = [["169.254.169.254"]]
    t0 = time.monotonic()
    err = failure(loader(), f"http://{address}/latest/meta-data/")
    assert REFUSED in str(err) and time.monotonic() - t0 < 0.5, str(err)  # no connection was tried


def test_public_addresses_pass_the_check():
    for ip in ("8.8.8.8", "93.184.216.34", "2606:4700::1111", "2a00:1450:4001:82b::200e"):
        assert media.address_refusal(ip) is None, ip
    assert media.address_refusal("169.254.169.254") and media.address_refusal("::ffff:10.0.0.1")


def test_every_resolved_address_is_checked(fake_dns):
    fake_dns["mixed.test"] = [["8.8.8.8", "10.0.0.1"]]  # one public, one private: refused
    assert REFUSED in str(failure(loader(), "http://mixed.test/a.png"))


def test_the_connection_goes_to_the_checked_address(host, as_public, fake_dns):
    """A rebinding name answers a public address to the check, a private one afterwards: the
    fetch connects to the address that was checked and never looks the name up again."""
    fake_dns["rebind.test"] = [["127.0.0.1"], ["10.9.9.9"]]
    img = loader().load_image(f"http://rebind.test:{host.port}/a.png")
    assert img.size == (56, 56)
    assert host.requests == [("/a.png", f"rebind.test:{host.port}")]  # the name in Host, as sent
    assert len(fake_dns["calls"]) == 1


def _tls_files(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA (its certificate file) and a key and certificate for ``name`` that it signed."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = tmp_path / "ca.pem", tmp_path / "key.pem", tmp_path / "cert.pem"
    paths[0].write_bytes(cert("test CA", ca_key, "test CA", ca_key, True).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].write_bytes(cert(name, key, "test CA", ca_key, False).public_bytes(serialization.Encoding.PEM))
    return paths


def test_https_to_the_checked_address_verifies_the_name(host, as_public, fake_dns, tmp_path, monkeypatch):
    """TLS goes to the checked address, with the name as SNI and for certificate checks."""
    pytest.importorskip("cryptography")
    import ssl

    ca, key, cert = _tls_files(tmp_path, "img.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), host.httpd.RequestHandlerClass)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(ca))
        monkeypatch.setattr(media, "_ssl_context", lambda: client_ctx)
        fake_dns["img.test"] = [["127.0.0.1"]]
        fake_dns["other.test"] = [["127.0.0.1"]]
        port = httpd.server_address[1]
        assert loader().load_image(f"https://img.test:{port}/a.png").size == (56, 56)
        assert host.requests == [("/a.png", f"img.test:{port}")]
        # Another name on the same address: the certificate does not match it.
        err = failure(loader(), f"https://other.test:{port}/a.png")
        assert FETCH_FAILED in str(err) and "certificate" in err.detail.lower(), err.detail
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- redirects: every hop under the same rules ----------------------------------------------------
def test_redirect_hops_are_checked(host, as_public, fake_dns):
    fake_dns["public.test"] = [["127.0.0.1"]]
    fake_dns["other.test"] = [["127.0.0.1"]]
    start = f"http://public.test:{host.port}/redirect-to/"
    assert loader().load_image(start + "a.png").size == (56, 56)  # a relative hop, same host
    assert [h for _, h in host.requests] == [f"public.test:{host.port}"] * 2
    for target in (f"http://127.0.0.2:{host.port}/a.png", "http://10.0.0.1/a.png",
                   f"http://[::1]:{host.port}/a.png", f"ftp://127.0.0.1:{host.ftp_port}/a.png"):
        host.requests.clear()
        t0 = time.monotonic()
        err = failure(loader(), start + target)
        # After a connection (the first hop answered), the refusal reads as any fetch failure.
        assert FETCH_FAILED in str(err) and time.monotonic() - t0 < 0.5, (target, str(err))
        assert len(host.requests) == 1, target
    assert host.ftp_connections == 0
    host.requests.clear()
    domains = loader(allowed_media_domains=("public.test",))
    err = failure(domains, start + f"http://other.test:{host.port}/a.png")
    assert FETCH_FAILED in str(err) and "allowed-media-domains" in err.detail
    assert [h for _, h in host.requests] == [f"public.test:{host.port}"]


# -- one message for every fetch failure ----------------------------------------------------------
def test_fetch_failures_all_read_the_same(host, caplog):
    opened = loader(allow_private_media_urls=True, max_bytes=10_000)
    closed = f"http://127.0.0.1:{free_port()}/a.png"
    cases = {"closed port": closed, "silent port": host.silent_url, "not an image": f"{host.url}/text",
             "404": f"{host.url}/missing", "500": f"{host.url}/error", "redirect loop": f"{host.url}/loop",
             "too large": f"{host.url}/big", "no such host": "http://no-such-host.invalid/a.png"}
    caplog.set_level(logging.INFO, logger="vlmserve.media")
    errors = {name: failure(opened, url) for name, url in cases.items()}
    messages = {same_message(str(e)) for e in errors.values()}
    assert len(messages) == 1 and FETCH_FAILED in messages.pop(), errors
    assert {e.status for e in errors.values()} == {400}
    # The detail stays in the log (and on the exception, for offline callers), under the id.
    for word, name in [("404", "404"), ("500", "500"), ("timed out", "silent port"), ("decode", "not an image"),
                       ("exceeds", "too large"), ("redirects", "redirect loop")]:
        assert word in errors[name].detail, (name, errors[name].detail)
    for err in errors.values():
        error_id = re.search(r"error id ([0-9a-f]+)", str(err)).group(1)
        assert any(error_id in r.getMessage() and err.detail in r.getMessage() for r in caplog.records), err


def test_policy_refusals_before_connecting_keep_their_message(host):
    assert "unsupported URL scheme" in str(failure(loader(), f"ftp://127.0.0.1:{host.ftp_port}/a.png"))
    err = failure(loader(allowed_media_domains=("example.com",)), f"{host.url}/a.png")
    assert "allowed-media-domains" in str(err)
    assert host.requests == [] and host.ftp_connections == 0


# -- the opt-in -------------------------------------------------------------------------------------
def test_fetches_send_a_user_agent_naming_vlmserve(host, as_public, fake_dns):
    """Some image hosts answer 403 to a library's default agent: every hop says it is vlmserve,
    to a private host allowed by config and to a public name alike (checked-address requests)."""
    from engine.media import USER_AGENT

    assert USER_AGENT.startswith("vlmserve/")
    before = len(host.user_agents)
    assert loader(allow_private_media_urls=True).load_image(f"{host.url}/redirect-to/a.png").size == (56, 56)
    fake_dns["img.example"] = [["127.0.0.1"]]
    assert loader().load_image(f"http://img.example:{host.port}/a.png").size == (56, 56)
    assert host.user_agents[before:] == [USER_AGENT] * 3


def test_opt_in_by_config_and_environment(host, monkeypatch):
    url = f"{host.url}/a.png"
    assert loader(allow_private_media_urls=True).load_image(url).size == (56, 56)
    monkeypatch.setenv(ALLOW_ENV, "1")
    assert loader().load_image(url).size == (56, 56)
    assert REFUSED in str(failure(loader(allow_private_media_urls=False), url))  # the config wins
    monkeypatch.setenv(ALLOW_ENV, "0")
    assert REFUSED in str(failure(loader(), url))
    monkeypatch.setenv(ALLOW_ENV, "maybe")
    with pytest.raises(ValueError, match=ALLOW_ENV):
        loader()


def test_opt_in_flag_and_offline_argument(tmp_path):
    from runtime.args import engine_args_from
    from runtime.serve import add_serve_args

    parser = add_serve_args(argparse.ArgumentParser())
    assert engine_args_from(parser.parse_args(["m", "--allow-private-media-urls"])).allow_private_media_urls
    default = engine_args_from(parser.parse_args(["m"]))
    assert default.allow_private_media_urls is None  # then the environment decides
    # LLM(...) takes EngineArgs' fields as keyword arguments.
    assert EngineArgs(model="m", allow_private_media_urls=True).media_config().allow_private_media_urls is True


# -- error messages without paths or memory addresses -----------------------------------------------
def test_local_file_errors_show_no_paths(tmp_path):
    root, outside = tmp_path / "media", tmp_path / "elsewhere"
    root.mkdir(), outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "folder").mkdir()
    local = loader(allowed_local_media_path=str(root))
    for name, words in [("link.png", "outside"), ("../elsewhere/secret.png", "outside"), ("missing.png", "no such"),
                        ("folder", "no such")]:
        msg = str(failure(local, f"file://{root / name}"))
        assert words in msg and str(tmp_path) not in msg and "secret" not in msg, msg


def test_decode_errors_show_no_memory_address():
    msg = str(failure(loader(), "data:image/png;base64," + base64.b64encode(b"not an image").decode()))
    assert "cannot decode image" in msg and "0x" not in msg and "BytesIO" not in msg, msg


# -- through the real server ------------------------------------------------------------------------
def _server(tmp_path_factory, args: list[str], **env: str) -> ServerProcess:
    model_dir = tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl_security"), seed=0)
    no_proxy = "127.0.0.1,localhost"
    return ServerProcess(model_dir, tmp_path_factory.mktemp("server") / "server.log", "tiny-vl",
                         ["--dtype", "float32", "--device", "cpu", "--max_model_len", "512", *args],
                         server_env(**env, NO_PROXY=no_proxy, no_proxy=no_proxy))


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def _ask_image(client: openai.OpenAI, url: str):
    return client.chat.completions.create(model="tiny-vl", max_tokens=2, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is this?"}]}])


def _refused_with(client: openai.OpenAI, url: str) -> str:
    with pytest.raises(openai.BadRequestError) as exc:
        _ask_image(client, url)
    return exc.value.body["message"]


def _connects(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(2)
        return s.connect_ex((address, port)) == 0


@pytest.fixture(scope="class")
def media_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    secret.write_bytes(b"x")
    (root / "link.png").symlink_to(secret)
    return root


@pytest.fixture(scope="class")
def default_server(tmp_path_factory, media_dir) -> Iterator[ServerProcess]:
    """``python -m runtime --host 127.0.0.1`` with the default media policy."""
    with running(_server(tmp_path_factory, ["--allowed-local-media-path", str(media_dir)])) as srv:
        yield srv


@pytest.fixture(scope="class")
def opened_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """``--allow-private-media-urls --allowed-media-domains 127.0.0.1``."""
    args = ["--allow-private-media-urls", "--allowed-media-domains", "127.0.0.1"]
    with running(_server(tmp_path_factory, args, VLMSERVE_IMAGE_FETCH_TIMEOUT=str(TIMEOUT_S))) as srv:
        yield srv


class TestDefaultServer:
    """The default media policy; both servers on 127.0.0.1 only."""

    @pytest.fixture
    def server(self, default_server) -> ServerProcess:
        return default_server

    def test_loopback_urls_are_refused(self, server, host):
        client = _client(server)
        port = server.port
        urls = [f"{server.url}/metrics", f"http://2130706433:{port}/metrics", f"http://0x7f000001:{port}/metrics",
                f"http://127.1:{port}/metrics", f"http://0.0.0.0:{port}/metrics", f"http://localhost:{port}/metrics",
                f"{host.url}/a.png", "http://169.254.169.254/latest/meta-data/"]
        for url in urls:
            assert REFUSED in _refused_with(client, url), url
        assert host.requests == []
        assert _ask_image(client, "data:image/png;base64," + base64.b64encode(host.image).decode()).choices

    def test_servers_bind_only_the_host_given(self, server):
        for port in (server.port, server.grpc_port):
            assert _connects("127.0.0.1", port), port
            assert not _connects("127.0.0.2", port), port  # loopback too, but not the address given
            if socket.has_ipv6:
                assert not _connects("::1", port), port

    def test_model_card_root_is_the_served_name(self, server):
        models = _client(server).models.list().data
        assert [(m.id, m.root) for m in models] == [("tiny-vl", "tiny-vl")]
        one = httpx.get(f"{server.url}/v1/models/tiny-vl", timeout=10)
        assert one.json()["root"] == "tiny-vl" and "/" not in one.text.replace("\\/", "")

    def test_error_bodies_show_no_paths_or_addresses(self, server, media_dir):
        client = _client(server)
        msg = _refused_with(client, f"file://{media_dir / 'link.png'}")
        assert "outside" in msg and str(media_dir.parent) not in msg and "secret" not in msg, msg
        msg = _refused_with(client, "data:image/png;base64," + base64.b64encode(b"not an image").decode())
        assert "cannot decode image" in msg and "0x" not in msg, msg


class TestOpenedServer:
    """Opened to this machine: fetches from 127.0.0.1, one message for every fetch failure,
    redirects held to the rules."""

    @pytest.fixture
    def server(self, opened_server) -> ServerProcess:
        return opened_server

    def test_fetch_failures_answer_one_message(self, server, host):
        client = _client(server)
        assert _ask_image(client, f"{host.url}/a.png").choices  # opened: 127.0.0.1 is fetched
        urls = [f"http://127.0.0.1:{free_port()}/a.png", host.silent_url, f"{host.url}/text", f"{host.url}/missing",
                f"{host.url}/error"]
        messages = [_refused_with(client, url) for url in urls]
        assert len({same_message(m) for m in messages}) == 1 and FETCH_FAILED in messages[0], messages
        assert "messages[0].content[0].image_url" in messages[0]
        log = server.log_path.read_text()
        for msg in messages:  # each failure's detail is in the server log under its id
            assert re.search(r"error id ([0-9a-f]+)", msg).group(1) in log
        assert "HTTP 404" in log and "timed out" in log

    def test_redirects_do_not_escape(self, server, host):
        client = _client(server)
        for target in (f"http://localhost:{host.port}/a.png", f"ftp://127.0.0.1:{host.ftp_port}/a.png"):
            host.requests.clear()
            assert FETCH_FAILED in _refused_with(client, f"{host.url}/redirect-to/{target}"), target
            assert [h for _, h in host.requests] == [f"127.0.0.1:{host.port}"], target
        assert host.ftp_connections == 0



def test_offline_chat_holds_each_conversation_to_the_request_pixel_budget(served_qwen2_vl):
    """``--max-request-image-pixels`` bounds one request's images together on the server; offline,
    ``LLM.chat`` used to check only each image alone. One conversation over the budget is refused,
    naming the limit; each conversation has a budget of its own, so two that fit both run."""
    from engine import LLM, SamplingParams
    from PIL import Image

    def data_url(k: int) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (112, 112), (40 * k, 90, 200)).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def conversation(n: int) -> list[dict]:  # image URLs: what the loader decodes, and bounds
        parts = [{"type": "image_url", "image_url": {"url": data_url(k)}} for k in range(n)]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]

    llm = LLM(model=str(served_qwen2_vl), dtype="float32", device="cpu", max_model_len=1024,
              max_request_image_pixels=2 * 112 * 112, limit_mm_per_prompt={"image": 3})
    params = SamplingParams(temperature=0, max_tokens=2)
    with pytest.raises(ValueError, match="max-request-image-pixels"):
        llm.chat(conversation(3), params)
    outs = llm.chat([conversation(2), conversation(2)], params)
    assert len(outs) == 2 and all(len(o.outputs[0].token_ids) == 2 for o in outs)
