"""Decoding untrusted video bytes (a chat ``video_url``) into frames, with PyAV (FFmpeg).

PyAV is an optional dependency (``pip install 'vlmserve[video]'``); without it ``decode_video``
raises a 400 that says what to send instead: the frames as ``image_url`` parts, or the offline API's
``{"type": "video", "video": frames}``.

The bytes come from anyone who can send a request, and FFmpeg is a large parser, so:

* only the containers and codecs of ordinary videos are opened (``CONTAINERS``, ``CODECS``), which
  keeps FFmpeg's other demuxers and decoders away from untrusted input;
* frame size is checked from the stream header before decoding, and again on every frame (a stream
  can change size), against ``VideoLimits.max_frame_pixels`` (413);
* at most ``max_decoded_frames`` frames are decoded and everything runs under one ``deadline_s``;
* ``num_frames`` frames are kept, sampled uniformly over the video as vLLM does
  (``linspace(0, total - 1, num_frames)``, all frames when there are fewer); each kept frame is
  also charged to the request's pixel budget through ``reserve_pixels``.

The frame count is the number of video packets (demuxed, not decoded: cheap), not the header's
claim, which a file can get wrong. The kept frames' rate, ``fps * kept / total``, goes with them:
Qwen2.5-VL spaces temporal positions by it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.media import MediaError

# FFmpeg's demuxer names (``container.format.name``) and decoder names.
CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})
CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"})
INSTEAD = ("send the frames as image_url parts, or use the offline API with "
           "{'type': 'video', 'video': [frames]}")


@dataclass(frozen=True)
class VideoLimits:
    num_frames: int = 32  # frames kept (vLLM's default for video URLs)
    max_frame_pixels: int = 3840 * 2160  # one frame, width * height (4K UHD)
    max_decoded_frames: int = 7200  # decoding work: 4 minutes at 30 fps
    deadline_s: float = 30.0  # the whole decode


def available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_error(what: str) -> MediaError:
    return MediaError(f"{what}: this server cannot decode videos (PyAV is not installed: pip install "
                      f"'vlmserve[video]'); {INSTEAD}")


def decode_video(
    data: bytes, what: str, limits: VideoLimits | None = None,
    reserve_pixels: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """``{"frames": uint8 (T, H, W, 3), "fps": float}`` of an encoded video; MediaError naming
    ``what`` (400, or 413 for a frame over the size limit) on anything else."""
    limits = limits or VideoLimits()
    try:
        import av
    except ImportError:
        raise unavailable_error(what) from None
    deadline = time.monotonic() + limits.deadline_s
    try:
        total, fps = _count_frames(av, data, what, limits, deadline)
        keep = set(_sample(total, limits.num_frames))
        frames = []
        with av.open(io.BytesIO(data), mode="r") as container:
            for index, frame in enumerate(container.decode(video=0)):
                _check_time(deadline, what, limits)
                if frame.width * frame.height > limits.max_frame_pixels:
                    raise _too_big(what, frame.width, frame.height, limits)
                if index in keep:
                    if reserve_pixels is not None:
                        reserve_pixels(frame.width, frame.height, what)
                    frames.append(frame.to_ndarray(format="rgb24"))
                if index >= max(keep):
                    break
    except MediaError:
        raise
    except Exception as exc:  # FFmpeg's errors for corrupt, truncated or unsupported data
        raise MediaError(f"{what}: cannot decode video ({type(exc).__name__}: {exc})") from exc
    if not frames:
        raise MediaError(f"{what}: the video has no decodable frames")
    if len({f.shape for f in frames}) > 1:
        raise MediaError(f"{what}: the video's frames change size; {INSTEAD}")
    return {"frames": np.stack(frames), "fps": fps * len(frames) / total}


def _count_frames(av: Any, data: bytes, what: str, limits: VideoLimits, deadline: float) -> tuple[int, float]:
    """(video packets, the stream's frame rate), after the container, codec and size checks."""
    with av.open(io.BytesIO(data), mode="r") as container:
        if container.format.name not in CONTAINERS:
            raise MediaError(f"{what}: unsupported video container {container.format.name!r}; use MP4, "
                             "WebM/Matroska or AVI")
        if not container.streams.video:
            raise MediaError(f"{what}: the file has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context
        if codec.name not in CODECS:
            raise MediaError(f"{what}: unsupported video codec {codec.name!r}; use one of {', '.join(sorted(CODECS))}")
        if codec.width * codec.height > limits.max_frame_pixels:
            raise _too_big(what, codec.width, codec.height, limits)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if not fps > 0:
            raise MediaError(f"{what}: the video has no frame rate")
        total = 0
        for packet in container.demux(stream):
            _check_time(deadline, what, limits)
            total += packet.size > 0  # the last, empty packet flushes the decoder
            if total > limits.max_decoded_frames:
                raise MediaError(f"{what}: the video has more than {limits.max_decoded_frames} frames; "
                                 f"send a shorter clip, or {INSTEAD}", 413)
    if total == 0:
        raise MediaError(f"{what}: the video has no frames")
    return total, fps


def _sample(total: int, num_frames: int) -> list[int]:
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames).astype(int).tolist()


def _check_time(deadline: float, what: str, limits: VideoLimits) -> None:
    if time.monotonic() > deadline:
        raise MediaError(f"{what}: decoding the video took longer than {limits.deadline_s:g} s")


def _too_big(what: str, width: int, height: int, limits: VideoLimits) -> MediaError:
    return MediaError(f"{what}: {width}x{height} video frames exceed the limit of {limits.max_frame_pixels} "
                      "pixels a frame", 413)
