"""Loading images named by URL: ``data:`` base64, ``http(s)://`` and ``file://``, with bounds.

The offline ``LLM.chat`` and the server use this one loader. Every untrusted input is bounded:
bytes downloaded or decoded, decoded pixels, total fetch time, URL schemes, remote domains (when
an allow-list is set) and local paths (only inside ``allowed_local_media_path``, after resolving
symlinks). Failures raise ``MediaError`` (a ValueError) with an HTTP status for the server.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_FETCH_TIMEOUT = 5.0


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
    max_pixels: int = 8192 * 8192


class MediaLoader:
    def __init__(self, config: MediaConfig | None = None) -> None:
        self.config = config or MediaConfig()
        root = self.config.allowed_local_media_path
        self.allowed_root = Path(root).resolve() if root else None

    @property
    def timeout(self) -> float:
        return self.config.fetch_timeout if self.config.fetch_timeout is not None else _env_timeout()

    def load_image(self, url: Any, what: str = "image_url") -> Any:
        """A PIL RGB image from a URL string; raises MediaError naming ``what`` on any problem."""
        if not isinstance(url, str) or not url:
            raise MediaError(f"{what}: expected a URL string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
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
            if width * height > self.config.max_pixels:
                raise MediaError(
                    f"{what}: {width}x{height} pixels exceeds the limit of {self.config.max_pixels}", 413
                )
            img.load()
            return img.convert("RGB")
        except MediaError:
            raise
        except Exception as exc:  # PIL raises many types for corrupt or truncated data
            raise MediaError(f"{what}: cannot decode image ({type(exc).__name__}: {exc})") from exc

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
        host = urllib.parse.urlsplit(url).hostname or ""
        domains = self.config.allowed_media_domains
        if domains is not None and host not in domains:
            raise MediaError(f"{what}: domain {host!r} is not in --allowed-media-domains")
        deadline = time.monotonic() + self.timeout
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                chunks, total = [], 0
                sock = _socket_of(resp)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise MediaError(f"{what}: fetching the image timed out after {self.timeout:g} s")
                    if sock is not None:  # a slow drip must not outlive the deadline
                        sock.settimeout(remaining)
                    chunk = resp.read1(64 * 1024)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > self.config.max_bytes:
                        raise MediaError(f"{what}: download exceeds the limit of {self.config.max_bytes} bytes", 413)
                    chunks.append(chunk)
                return b"".join(chunks)
        except MediaError:
            raise
        except TimeoutError as exc:
            raise MediaError(f"{what}: fetching the image timed out after {self.timeout:g} s") from exc
        except Exception as exc:  # URLError, HTTPError, socket errors
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise MediaError(f"{what}: fetching the image timed out after {self.timeout:g} s") from exc
            raise MediaError(f"{what}: cannot fetch image ({type(exc).__name__}: {reason})") from exc

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


def _socket_of(resp: Any) -> Any:
    """The socket under an urllib response (to bound each read by the time left), if reachable."""
    raw = getattr(getattr(resp, "fp", None), "raw", None)
    return getattr(raw, "_sock", None)
