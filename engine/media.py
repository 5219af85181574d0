"""Loading images named by URL: ``data:`` base64, ``http(s)://`` and ``file://``, with bounds.

The offline ``LLM.chat`` and the server use this one loader. Every untrusted input is bounded:
bytes downloaded or decoded, decoded pixels, total fetch time, URL schemes, remote domains (when
an allow-list is set) and local paths (only inside ``allowed_local_media_path``, after resolving
symlinks). Failures raise ``MediaError`` (a ValueError) with an HTTP status for the server.

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
import os
import ssl
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import httpx

DEFAULT_FETCH_TIMEOUT = 5.0
# Decoded pixels, width * height. One RGB image costs 3 bytes a pixel, plus PIL's and the image
# processor's working copies (an 8000x8000 PNG took ~358 MiB of RSS). 6144^2 (37.7 Mpixel) still
# takes a 36-Mpixel camera photo whole; a request's images together get 8192^2.
DEFAULT_MAX_PIXELS = 6144 * 6144
DEFAULT_MAX_TOTAL_PIXELS = 8192 * 8192
MAX_REDIRECTS = 10  # as urllib's
T = TypeVar("T")


class MediaError(ValueError):
    """An image that cannot be used; ``status`` is the HTTP code the server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _env_timeout() -> float:
    for name in ("VLMSERVE_IMAGE_FETCH_TIMEOUT", "VLLM_IMAGE_FETCH_TIMEOUT"):
        value = os.environ.get(name)
        if value:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{name}: expected seconds, got {value!r}") from None
    return DEFAULT_FETCH_TIMEOUT


@dataclass(frozen=True)
class MediaConfig:
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] | None = None
    fetch_timeout: float | None = None  # None: $VLMSERVE_IMAGE_FETCH_TIMEOUT, $VLLM_IMAGE_FETCH_TIMEOUT, or 5 s
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS  # one image
    max_total_pixels: int = DEFAULT_MAX_TOTAL_PIXELS  # all images of one request (``for_request``)


class MediaLoader:
    _pixels_left: int | None = None  # set by for_request: what is left of the request's pixel budget

    def __init__(self, config: MediaConfig | None = None) -> None:
        self.config = config or MediaConfig()
        root = self.config.allowed_local_media_path
        self.allowed_root = Path(root).resolve() if root else None

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
        if not isinstance(url, str) or not url:
            raise MediaError(f"{what}: expected a URL string")
        scheme = url_scheme(url)
        if scheme == "data":
            data = self._decode_data_url(url, what)
        elif scheme in ("http", "https"):
            data = self._fetch(url, what)
        elif scheme == "file":
            data = self._read_local(url, what)
        else:
            raise MediaError(f"{what}: unsupported URL scheme {scheme or url[:16]!r}; use data:, http(s):// or file://")
        return self.decode_image(data, what)

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
            raise MediaError(f"{what}: cannot decode image ({type(exc).__name__}: {exc})") from exc

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
            raise MediaError(f"{what}: a data URL must look like data:image/png;base64,...")
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
        except MediaError:
            raise
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise self._timed_out(what) from exc
        except Exception as exc:  # httpx's transport, protocol and URL errors, OSError
            import httpx

            if isinstance(exc, httpx.TimeoutException):  # a per-operation timeout, also <= the total
                raise self._timed_out(what) from exc
            raise MediaError(f"{what}: cannot fetch image ({type(exc).__name__}: {exc})") from exc

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

        return httpx.AsyncClient(follow_redirects=False, timeout=self.timeout, verify=_ssl_context(),
                                 headers={"Accept-Encoding": "identity"})

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
        if client is None:
            async with self.http_client() as own:
                return await self._download(url, what, own)
        for _ in range(MAX_REDIRECTS + 1):
            self._check_remote(url, what)  # every hop: a redirect must not escape the allow-list
            async with client.stream("GET", url) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    url = str(resp.url.join(resp.headers["location"]))
                    continue
                if resp.status_code >= 400:
                    raise MediaError(f"{what}: cannot fetch image (HTTP {resp.status_code} {resp.reason_phrase})")
                return await self._read_body(resp, what)
        raise MediaError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _check_remote(self, url: str, what: str) -> None:
        scheme = url_scheme(url)
        if scheme not in ("http", "https"):
            raise MediaError(f"{what}: unsupported URL scheme {scheme or url[:16]!r}; use http(s)://")
        host = urllib.parse.urlsplit(url).hostname or ""
        domains = self.config.allowed_media_domains
        if domains is not None and host not in domains:
            raise MediaError(f"{what}: domain {host!r} is not in --allowed-media-domains")

    async def _read_body(self, resp: httpx.Response, what: str) -> bytes:
        limit = self.config.max_bytes
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MediaError(f"{what}: download of {declared} bytes exceeds the limit of {limit} bytes", 413)
        chunks, total = [], 0
        async for chunk in resp.aiter_bytes():
            total += len(chunk)
            if total > limit:  # a missing or lying Content-Length
                raise MediaError(f"{what}: download exceeds the limit of {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    def _timed_out(self, what: str) -> MediaError:
        return MediaError(f"{what}: fetching the image timed out after {self.timeout:g} s")

    def _read_local(self, url: str, what: str) -> bytes:
        if self.allowed_root is None:
            raise MediaError(f"{what}: file:// URLs need --allowed-local-media-path")
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
        if not path.is_relative_to(self.allowed_root):
            raise MediaError(f"{what}: {path} is outside the allowed local media path")
        if not path.is_file():
            raise MediaError(f"{what}: no such file {path}")
        if path.stat().st_size > self.config.max_bytes:
            raise MediaError(f"{what}: file exceeds the limit of {self.config.max_bytes} bytes", 413)
        return path.read_bytes()


class _PrefetchedLoader(MediaLoader):
    """``MediaLoader.with_prefetched``: same bounds, remote images from a dict."""

    def __init__(self, base: MediaLoader, fetched: Mapping[str, bytes]) -> None:
        self.config = base.config
        self.allowed_root = base.allowed_root
        self._fetched = fetched

    def _fetch(self, url: str, what: str) -> bytes:
        data = self._fetched.get(url)
        if data is None:  # the server's URL collection missed a part parse_chat loads: a bug
            raise MediaError(f"{what}: the image was not fetched before rendering", 500)
        return data


def url_scheme(url: str) -> str:
    """The lower-cased scheme of a URL string ("" without one)."""
    return url.split(":", 1)[0].lower() if ":" in url else ""


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
