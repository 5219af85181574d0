"""Loading images (and videos) named by URL: ``data:`` base64, ``http(s)://`` and ``file://``, with
bounds. Videos get the same URL rules and byte limit, then ``engine.video_decode`` (PyAV, optional).

The offline ``LLM.chat`` and the server use this one loader. Every untrusted input is bounded:
bytes downloaded or decoded, decoded pixels, total fetch time, URL schemes, remote domains (when
an allow-list is set), remote addresses and local paths (only inside ``allowed_local_media_path``,
after resolving symlinks). Failures raise ``MediaError`` (a ValueError) with an HTTP status for
the server.

Remote addresses (SSRF): unless ``allow_private_media_urls`` (``--allow-private-media-urls``,
``$VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS``), a host must resolve only to public addresses: loopback,
private, link-local (cloud metadata), unspecified, multicast and reserved ones are refused in any
spelling. Every redirect hop is resolved and checked the same way, and the request goes to the
address that was checked (the name travels in Host and TLS SNI), so a second DNS answer cannot
swap it. Every failure after these checks (closed or silent port, HTTP status, an answer that is
no image, a body over the limit) raises the same message with an error id, the detail logged
and kept in ``MediaError.detail``: different messages would make the server a port scanner.

Remote fetches are async (httpx) under one total deadline (``fetch_async``). The server fetches a
request's images concurrently on its event loop (``fetch_all_async``) and hands the bytes to its
prompt workers (``with_prefetched``), so a slow host holds neither the loop nor a worker; offline
``LLM.chat`` runs the same fetch on a private loop (``load_image``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import copy
import functools
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import httpx

    from engine.video_decode import VideoLimits

DEFAULT_FETCH_TIMEOUT = 5.0
# Decoded pixels, width * height. One RGB image costs 3 bytes a pixel, plus PIL's and the image
# processor's working copies (an 8000x8000 PNG took ~358 MiB of RSS). 6144^2 (37.7 Mpixel) still
# takes a 36-Mpixel camera photo whole; a request's images together get 8192^2.
DEFAULT_MAX_PIXELS = 6144 * 6144
DEFAULT_MAX_TOTAL_PIXELS = 8192 * 8192
MAX_REDIRECTS = 10  # as urllib's
ALLOW_PRIVATE_ENV = "VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS"


def _user_agent() -> str:
    # Some image hosts (the guide's among them) answer 403 to a library's default agent.
    try:
        from importlib.metadata import version

        ours = version("vlmserve")
    except Exception:  # noqa: BLE001 - running from a source tree that is not installed
        ours = "0"
    return f"vlmserve/{ours} (image fetch)"


USER_AGENT = _user_agent()
T = TypeVar("T")
logger = logging.getLogger("vlmserve.media")


class MediaError(ValueError):
    """An image that cannot be used; ``status`` is the HTTP code the server answers with.
    ``detail``: what went wrong where the message is deliberately generic (also logged)."""

    def __init__(self, message: str, status: int = 400, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class _FetchFailure(Exception):
    """A fetch failed after the policy checks; it reaches the caller only as the generic message."""


def _env_timeout() -> float:
    for name in ("VLMSERVE_IMAGE_FETCH_TIMEOUT", "VLLM_IMAGE_FETCH_TIMEOUT"):
        value = os.environ.get(name)
        if value:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{name}: expected seconds, got {value!r}") from None
    return DEFAULT_FETCH_TIMEOUT


def allow_private_from_env() -> bool:
    """``$VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS`` as a bool (unset: False); ValueError naming it."""
    value = os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{ALLOW_PRIVATE_ENV}: expected 1, true, yes, on or 0, false, no, off; got {value!r}")


@dataclass(frozen=True)
class MediaConfig:
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] | None = None
    fetch_timeout: float | None = None  # None: $VLMSERVE_IMAGE_FETCH_TIMEOUT, $VLLM_IMAGE_FETCH_TIMEOUT, or 5 s
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS  # one image
    max_total_pixels: int = DEFAULT_MAX_TOTAL_PIXELS  # all images of one request (``for_request``)
    # Fetch from hosts that are or resolve to non-public addresses (internal image hosts, tests).
    # None: $VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS, default off.
    allow_private_media_urls: bool | None = None
    video_limits: VideoLimits | None = None  # None: engine.video_decode.VideoLimits()


class MediaLoader:
    _pixels_left: int | None = None  # set by for_request: what is left of the request's pixel budget

    def __init__(self, config: MediaConfig | None = None) -> None:
        self.config = config or MediaConfig()
        root = self.config.allowed_local_media_path
        self.allowed_root = Path(root).resolve() if root else None
        allow = self.config.allow_private_media_urls
        self.allow_private = allow_private_from_env() if allow is None else allow

    def for_request(self) -> MediaLoader:
        """A copy that also bounds the decoded pixels of all the images it loads together
        (``max_total_pixels``): use one per request. Not shared between threads."""
        loader = copy.copy(self)
        loader._pixels_left = self.config.max_total_pixels
        return loader

    @property
    def timeout(self) -> float:
        return self.config.fetch_timeout if self.config.fetch_timeout is not None else _env_timeout()

    def load_image(self, url: Any, what: str = "image_url") -> Any:
        """A PIL RGB image from a URL string; raises MediaError naming ``what`` on any problem."""
        return self._load(url, what, self.decode_image)

    def load_video(self, url: Any, what: str = "video_url") -> dict[str, Any]:
        """``{"frames": uint8 (T, H, W, 3), "fps": float}`` from a video URL string (the URL rules
        of images), frames sampled and bounded by ``engine.video_decode``; MediaError naming
        ``what``. Without PyAV it refuses before fetching anything."""
        from engine import video_decode

        if not video_decode.available():
            raise video_decode.unavailable_error(what)

        def decode(data: bytes, what: str) -> dict[str, Any]:
            if len(data) > self.config.max_bytes:
                raise MediaError(f"{what}: {len(data)} bytes exceeds the limit of {self.config.max_bytes}", 413)
            return video_decode.decode_video(data, what, self.config.video_limits, self._reserve_pixels)

        return self._load(url, what, decode)

    def _load(self, url: Any, what: str, decode: Callable[[bytes, str], T]) -> T:
        """``decode(bytes, what)`` of the media a URL names, by scheme."""
        if not isinstance(url, str) or not url:
            raise MediaError(f"{what}: expected a URL string")
        scheme = url_scheme(url)
        if scheme == "data":
            data = self._decode_data_url(url, what)
        elif scheme in ("http", "https"):
            return self._decode_fetched(self._fetch(url, what), url, what, decode)
        elif scheme == "file":
            data = self._read_local(url, what)
        else:
            raise MediaError(f"{what}: unsupported URL scheme {scheme or url[:16]!r}; use data:, http(s):// or file://")
        return decode(data, what)

    def decode_image(self, data: bytes, what: str = "image") -> Any:
        """Decode encoded image bytes fully (so truncation is caught here), bounded in pixels."""
        from PIL import Image

        if len(data) > self.config.max_bytes:
            raise MediaError(f"{what}: {len(data)} bytes exceeds the limit of {self.config.max_bytes}", 413)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            self._reserve_pixels(width, height, what)
            img.load()
            # convert() copies even an RGB image: skip it (the copy doubled a large image's RSS).
            return img if img.mode == "RGB" else img.convert("RGB")
        except MediaError:
            raise
        except Image.DecompressionBombError as exc:  # past PIL's own limit (2 * MAX_IMAGE_PIXELS), at open
            raise MediaError(f"{what}: the image's pixel count exceeds the limit of {self.config.max_pixels} "
                             f"(--max-image-pixels) ({exc})", 413) from exc
        except Exception as exc:  # PIL raises many types for corrupt or truncated data
            raise MediaError(f"{what}: cannot decode image ({_pil_problem(exc)})") from exc

    def _decode_fetched(self, data: bytes, url: str, what: str,
                        decode: Callable[[bytes, str], T] | None = None) -> Any:
        """Decode downloaded bytes. An answer that is no image reads as any other fetch failure
        (else an open port that answers tells itself apart from a closed one); the pixel limit
        keeps its 413, as only a real image gets that far, which a successful fetch shows too."""
        try:
            return (decode or self.decode_image)(data, what)
        except MediaError as exc:
            if exc.status == 413:
                raise
            raise self._fetch_failed(what, url, str(exc)) from exc

    def _reserve_pixels(self, width: int, height: int, what: str) -> None:
        """Refuse (413) an image over the per-image limit or the request's remaining budget,
        from its header alone: nothing is decoded yet."""
        pixels, limit = width * height, self.config.max_pixels
        if pixels > limit:
            raise MediaError(f"{what}: {width}x{height} pixels exceeds the limit of {limit} (--max-image-pixels)", 413)
        if self._pixels_left is None:
            return
        if pixels > self._pixels_left:
            total = self.config.max_total_pixels
            raise MediaError(f"{what}: {width}x{height} pixels brings the request's images past the limit of "
                             f"{total} pixels together (--max-request-image-pixels)", 413)
        self._pixels_left -= pixels

    def _decode_data_url(self, url: str, what: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise MediaError(f"{what}: a data URL must look like data:image/png;base64,... (or data:video/mp4;base64,...)")
        if len(payload) > self.config.max_bytes * 4 // 3 + 4:
            raise MediaError(f"{what}: encoded image exceeds the limit of {self.config.max_bytes} bytes", 413)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(f"{what}: invalid base64 data ({exc})") from exc

    def _fetch(self, url: str, what: str) -> bytes:
        """The synchronous fetch (offline ``LLM.chat``): the async fetch on a private event loop,
        so the same total deadline holds."""
        return _run_blocking(lambda: self.fetch_async(url, what))

    async def fetch_async(self, url: str, what: str = "image_url", client: httpx.AsyncClient | None = None,
                          slots: asyncio.Semaphore | None = None) -> bytes:
        """Download an http(s) URL within one total deadline (waiting for one of ``slots``, connect,
        headers and body of every redirect hop): urllib-style per-socket-operation timeouts let a
        host that drips one byte at a time hold a fetch for ever. ``client``: an
        ``httpx.AsyncClient`` from ``http_client()`` to share, else one is made for this fetch."""
        try:
            return await asyncio.wait_for(self._fetch_in_slot(url, what, client, slots), self.timeout)
        except MediaError:  # refused by policy before any connection: tells nothing about the host
            raise
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise self._fetch_failed(what, url, self._timed_out()) from exc
        except Exception as exc:  # ours, httpx's transport, protocol and URL errors, OSError (DNS)
            import httpx

            if isinstance(exc, httpx.TimeoutException):  # a per-operation timeout, also <= the total
                raise self._fetch_failed(what, url, self._timed_out()) from exc
            detail = str(exc) if isinstance(exc, _FetchFailure) else f"{type(exc).__name__}: {exc}"
            raise self._fetch_failed(what, url, detail) from exc

    async def fetch_all_async(self, refs: Sequence[tuple[str, str]],
                              slots: asyncio.Semaphore | None = None) -> dict[str, bytes]:
        """``{url: bytes}`` of ``refs`` (``(url, what)`` pairs, http(s) only), fetched concurrently
        over one client, each within its own deadline. The first failure (in ``refs`` order among
        those done) is raised and the other fetches are cancelled: the request fails anyway."""
        unique: dict[str, str] = {}
        for url, what in refs:
            unique.setdefault(url, what)  # one fetch per URL; errors name its first part
        if not unique:
            return {}
        async with self.http_client() as client:
            tasks = [asyncio.ensure_future(self.fetch_async(url, what, client, slots)) for url, what in unique.items()]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:  # also when the request itself is cancelled (its client went away)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)  # unwound before the client closes
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            return {url: task.result() for url, task in zip(unique, tasks)}

    def http_client(self) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for image fetches: redirects are followed by ``_download``
        (each hop re-checked), bodies come unencoded (so ``max_bytes`` counts what is stored)."""
        import httpx

        # No kept-alive connections: requests go to checked addresses (``_hop_requests``), and a
        # pool keyed by address could hand one host's TLS connection to another name.
        return httpx.AsyncClient(follow_redirects=False, timeout=self.timeout, verify=_ssl_context(),
                                 headers={"Accept-Encoding": "identity", "User-Agent": USER_AGENT},
                                 limits=httpx.Limits(max_keepalive_connections=0))

    def with_prefetched(self, fetched: Mapping[str, bytes]) -> MediaLoader:
        """A loader that takes http(s) URLs from ``fetched`` (see ``fetch_all_async``) and never
        touches the network: the server's prompt workers only decode."""
        return _PrefetchedLoader(self, fetched)

    async def _fetch_in_slot(self, url: str, what: str, client: httpx.AsyncClient | None,
                             slots: asyncio.Semaphore | None) -> bytes:
        if slots is None:
            return await self._download(url, what, client)
        async with slots:
            return await self._download(url, what, client)

    async def _download(self, url: str, what: str, client: httpx.AsyncClient | None) -> bytes:
        import httpx

        if client is None:
            async with self.http_client() as own:
                return await self._download(url, what, own)
        for hop in range(MAX_REDIRECTS + 1):
            resp = await self._send_hop(client, url, what, hop)
            try:
                if resp.is_redirect and "location" in resp.headers:
                    # Joined to the URL asked for, not to the address the request went to.
                    url = str(httpx.URL(url).join(resp.headers["location"]))
                    continue
                if resp.status_code >= 400:
                    raise _FetchFailure(f"HTTP {resp.status_code} {resp.reason_phrase}")
                return await self._read_body(resp)
            finally:
                await resp.aclose()
        raise _FetchFailure(f"more than {MAX_REDIRECTS} redirects")

    async def _send_hop(self, client: httpx.AsyncClient, url: str, what: str, hop: int) -> httpx.Response:
        """GET one hop (streamed) after the policy checks, trying each checked address in turn."""
        try:
            requests = await self._hop_requests(client, url, what)
        except MediaError as exc:
            if hop == 0:  # decided before any connection: the refusal may say why
                raise
            # A later hop follows a host's answer: its refusal reads as any fetch failure.
            raise _FetchFailure(f"the redirect to {url[:256]} was refused: {exc.detail or exc}") from exc
        import httpx

        for i, request in enumerate(requests):
            try:
                return await client.send(request, stream=True)
            except httpx.ConnectError:
                if i == len(requests) - 1:
                    raise
        raise AssertionError("unreachable: resolve_host answers at least one address")

    async def _hop_requests(self, client: httpx.AsyncClient, url: str, what: str) -> list[httpx.Request]:
        """The requests that may fetch ``url``: to each address its host resolves to, all of them
        checked (the name goes in Host and TLS SNI, so virtual hosts and certificates still
        work); one plain request when private hosts are allowed."""
        parsed = self._check_remote(url, what)
        if self.allow_private:
            return [client.build_request("GET", parsed)]
        host = parsed.raw_host.decode("ascii")
        addresses = await resolve_host(host, parsed.port or (443 if parsed.scheme == "https" else 80))
        for address in addresses:
            reason = address_refusal(address)
            if reason is not None:
                raise MediaError(f"{what}: the URL's host is not allowed: it is or resolves to a loopback, private, "
                                 "link-local or otherwise non-public address (a server started with "
                                 "--allow-private-media-urls fetches from such hosts)",
                                 detail=f"{host} resolves to {address} ({reason})")
        headers = {"Host": parsed.netloc.decode("ascii")}
        return [client.build_request("GET", parsed.copy_with(host=address), headers=headers,
                                     extensions={"sni_hostname": host}) for address in addresses]

    def _check_remote(self, url: str, what: str) -> httpx.URL:
        """``url`` parsed, if its scheme and domain may be fetched. httpx's parser, the one that
        sends the request: another one could read another host out of an odd URL."""
        import httpx

        scheme = url_scheme(url)
        if scheme not in ("http", "https"):
            raise MediaError(f"{what}: unsupported URL scheme {scheme or url[:16]!r}; use http(s)://")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise MediaError(f"{what}: invalid URL ({exc})") from exc
        if not parsed.raw_host:
            raise MediaError(f"{what}: the URL has no host")
        domains = self.config.allowed_media_domains
        names = {parsed.host.rstrip("."), parsed.raw_host.decode("ascii").rstrip(".")}
        if domains is not None and not names & set(domains):
            raise MediaError(f"{what}: domain {parsed.host!r} is not in --allowed-media-domains")
        return parsed

    async def _read_body(self, resp: httpx.Response) -> bytes:
        limit = self.config.max_bytes
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _FetchFailure(f"the download of {declared} bytes exceeds the limit of {limit} bytes")
        chunks, total = [], 0
        async for chunk in resp.aiter_bytes():
            total += len(chunk)
            if total > limit:  # a missing or lying Content-Length
                raise _FetchFailure(f"the download exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _timed_out(self) -> str:
        return f"timed out after {self.timeout:g} s"

    def _fetch_failed(self, what: str, url: str, detail: str) -> MediaError:
        """The one message for every fetch failure; the detail goes to the log under its id."""
        error_id = uuid.uuid4().hex
        logger.warning("%s: fetching %s failed (error id %s): %s", what, url[:256], error_id, detail)
        return MediaError(f"{what}: the image could not be fetched (error id {error_id}; the details are in the log)",
                          detail=detail)

    def _read_local(self, url: str, what: str) -> bytes:
        """The file's bytes. Messages name no path: the resolved one shows where a symlink points."""
        if self.allowed_root is None:
            raise MediaError(f"{what}: file:// URLs need --allowed-local-media-path")
        try:
            path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
            raise MediaError(f"{what}: no such file under the allowed local media path") from exc
        if not path.is_relative_to(self.allowed_root):
            raise MediaError(f"{what}: the file is outside the allowed local media path (--allowed-local-media-path)")
        if not path.is_file():
            raise MediaError(f"{what}: no such file under the allowed local media path")
        try:
            if path.stat().st_size > self.config.max_bytes:
                raise MediaError(f"{what}: file exceeds the limit of {self.config.max_bytes} bytes", 413)
            return path.read_bytes()
        except OSError as exc:  # permissions, a file removed meanwhile
            logger.warning("%s: reading %s failed: %s", what, path, exc)
            raise MediaError(f"{what}: the file cannot be read") from exc


class _PrefetchedLoader(MediaLoader):
    """``MediaLoader.with_prefetched``: same bounds, remote images from a dict."""

    def __init__(self, base: MediaLoader, fetched: Mapping[str, bytes]) -> None:
        self.config = base.config
        self.allowed_root = base.allowed_root
        self.allow_private = base.allow_private
        self._fetched = fetched

    def _fetch(self, url: str, what: str) -> bytes:
        data = self._fetched.get(url)
        if data is None:  # the server's URL collection missed a part parse_chat loads: a bug
            raise MediaError(f"{what}: the image was not fetched before rendering", 500)
        return data


def url_scheme(url: str) -> str:
    """The lower-cased scheme of a URL string ("" without one)."""
    return url.split(":", 1)[0].lower() if ":" in url else ""


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order, without repeats. The system
    resolver also reads odd IPv4 spellings (2130706433, 0x7f000001, 127.1) as the address they
    are, so what is checked is what a connection would reach."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_refusal(address: str) -> str | None:
    """Why connecting to ``address`` is refused by default ("loopback", "private", ...), or
    None for a public unicast address. An IPv6 address that carries an IPv4 one (mapped, 6to4,
    NAT64) is judged by the IPv4 address it reaches."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without a scope id (fe80::1%eth0)
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return address_refusal(str(embedded))
    checks = [("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
              ("link-local, as cloud metadata", ip.is_link_local), ("multicast", ip.is_multicast),
              ("private", ip.is_private), ("reserved", ip.is_reserved),
              ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
              ("not globally routable", not ip.is_global)]  # e.g. 100.64.0.0/10, shared (CGNAT)
    return next((reason for reason, hit in checks if hit), None)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _pil_problem(exc: Exception) -> str:
    """PIL's reason, without the object reprs it quotes (they carry memory addresses)."""
    text = re.sub(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>", "", str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """The system's default verification (as urllib had), built once: loading CAs per client is slow."""
    return ssl.create_default_context()


def _run_blocking(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code: on a private event loop in this
    thread, or on a helper thread when this thread already runs a loop (LLM.chat called from
    async code, e.g. a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_on_new_loop(make())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlmserve-fetch") as pool:
        return pool.submit(lambda: _run_on_new_loop(make())).result()


def _run_on_new_loop(coro: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        # Not asyncio.run: its shutdown waits for the default executor, where a DNS lookup past
        # the deadline may still be running; close() leaves that thread to finish on its own.
        loop.close()
