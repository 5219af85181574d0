"""``video_url`` chat parts, decoded with PyAV (``engine.video_decode``), on real video files made
here with PyAV's encoder.

* Decoding: a lossless H.264 MP4 (``libx264rgb``, qp 0) gives back exactly the frames encoded and
  their rate; a long video keeps ``num_frames`` frames spread uniformly from first to last (the
  rate scaled to match); the bounds (frame size, frame count, deadline), the container and codec
  allow-lists and corrupt data raise MediaError naming the part.
* Offline ``LLM.chat`` with the video as a ``data:`` and a ``file://`` URL, and the served
  ``/v1/chat/completions`` (``qwen2_vl_serve``'s generate server), equal HF ``generate`` on the
  frames as encoded — independent of the decoder, since the file is lossless; bad videos, and
  more videos than ``--limit-mm-per-prompt``, are 400s naming the part.

Skipped where PyAV is not installed (it is the optional ``video`` extra; the test extra has it).
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

pytest.importorskip("av")

import tiny_vlm  # noqa: E402
from qwen2_vl_serve import SERVED_NAME, data_url  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.media import MediaConfig, MediaError, MediaLoader  # noqa: E402
from engine.video_decode import VideoLimits, decode_video  # noqa: E402

MAX_TOKENS = 8
FPS = 4
QUESTION = "What happens in the video?"


def make_frames(n: int, h: int = 56, w: int = 84, seed: int = 0) -> list[np.ndarray]:
    """n different uint8 RGB frames (a drifting noise pattern)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) ^ np.uint8(i) for i in range(n)]


def encode(frames: list[np.ndarray], codec: str = "libx264rgb", fmt: str = "mp4", pix_fmt: str = "rgb24",
           options: dict[str, str] | None = None) -> bytes:
    """A video file's bytes; libx264rgb at qp 0 is lossless H.264 in RGB."""
    import av

    h, w, _ = frames[0].shape
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        stream.options = {"qp": "0"} if options is None and codec == "libx264rgb" else (options or {})
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


FRAMES = make_frames(6)
VIDEO = encode(FRAMES)


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def test_lossless_mp4_gives_back_its_frames_and_rate():
    out = decode_video(VIDEO, "v")
    assert out["frames"].dtype == np.uint8 and out["frames"].shape == (6, 56, 84, 3)
    assert all((got == want).all() for got, want in zip(out["frames"], FRAMES))
    assert out["fps"] == FPS


def test_long_video_keeps_num_frames_spread_uniformly():
    frames = make_frames(40, 28, 28, seed=1)
    out = decode_video(encode(frames), "v", VideoLimits(num_frames=8))
    # Which source frame is each kept one? (all 40 differ)
    index = [next(i for i, f in enumerate(frames) if (f == kept).all()) for kept in out["frames"]]
    gaps = np.diff(index)
    assert len(index) == 8 and index[0] == 0 and index[-1] == 39
    assert (gaps > 0).all() and gaps.max() - gaps.min() <= 1, index
    assert out["fps"] == pytest.approx(FPS * 8 / 40)  # the kept frames span the same seconds


def test_bounds_and_allow_lists_raise_naming_the_part():
    cases = [
        (VIDEO, VideoLimits(max_frame_pixels=56 * 84 - 1), 413, "exceed the limit"),
        (VIDEO, VideoLimits(max_decoded_frames=5), 413, "more than 5 frames"),
        (VIDEO, VideoLimits(deadline_s=0.0), 400, "took longer"),
        (VIDEO[: len(VIDEO) // 3], None, 400, "cannot decode video|no frames"),  # truncated
        (b"\x00" * 4096, None, 400, "cannot decode video"),
        (encode(FRAMES, "png", "mov"), None, 400, "unsupported video codec 'png'"),  # not on the allow-list
    ]
    for data, limits, status, match in cases:
        with pytest.raises(MediaError, match=rf"^messages\[0\]\.content\[0\]\.video_url: .*({match})") as info:
            decode_video(data, "messages[0].content[0].video_url", limits)
        assert info.value.status == status, (match, info.value)
    # A request's pixel budget counts the kept frames, as it counts images.
    loader = MediaLoader(MediaConfig(max_total_pixels=56 * 84 * 5)).for_request()
    with pytest.raises(MediaError, match="together"):
        loader.load_video(data_url(VIDEO, "video/mp4"), "video_url")


# ---------------------------------------------------------------------------------------------
# Through the engine and the server, against HF
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(served_qwen2_vl):
    """HF greedy reference on the frames as encoded (PIL), via tiny_vlm.hf_greedy_reference."""
    from PIL import Image
    from transformers import AutoTokenizer

    hf = tiny_vlm.load_hf_qwen2_vl(served_qwen2_vl)
    processor = tiny_vlm.load_image_processor(served_qwen2_vl)
    tok = AutoTokenizer.from_pretrained(str(served_qwen2_vl))
    get = tiny_vlm.hf_greedy_reference(hf, processor, tok, MAX_TOKENS,
                                       video_pixels=lambda v: tiny_vlm.video_pixel_values(v, processor))
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|video_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    ids, out = get(text, videos=[[Image.fromarray(f) for f in FRAMES]])
    return ids, out, tok.decode(out, skip_special_tokens=True)


def test_offline_chat_data_and_file_urls_equal_hf(served_qwen2_vl, ref, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(VIDEO)
    llm = LLM(str(served_qwen2_vl), dtype="float32", device="cpu", max_model_len=1024,
              allowed_local_media_path=str(tmp_path))
    ids, want, _ = ref
    for url in (data_url(VIDEO, "video/mp4"), path.as_uri()):
        messages = [{"role": "user", "content": [video_part(url), {"type": "text", "text": QUESTION}]}]
        out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
        assert out.prompt_token_ids == ids and list(out.outputs[0].token_ids) == want


def test_served_chat_with_video_url_equals_hf(qwen2_vl_servers, ref):
    import openai

    server = qwen2_vl_servers["generate"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=120)
    resp = client.chat.completions.create(model=SERVED_NAME, max_tokens=MAX_TOKENS, temperature=0.0, messages=[
        {"role": "user", "content": [video_part(data_url(VIDEO, "video/mp4")), {"type": "text", "text": QUESTION}]}])
    ids, _, text = ref
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.choices[0].message.content == text

    def post(content: list) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"model": SERVED_NAME, "messages": [{"role": "user", "content": content}]})

    bad = post([video_part("data:video/mp4;base64," + "A" * 64), {"type": "text", "text": "?"}])
    assert bad.status_code == 400 and "content[0].video_url" in bad.json()["error"]["message"], bad.text
    two = post([video_part(data_url(VIDEO, "video/mp4"))] * 2)
    assert two.status_code == 400 and "video=1" in two.json()["error"]["message"], two.text
