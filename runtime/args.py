"""Engine and front-end flags shared by ``python -m runtime`` and ``vlmserve serve``.

The flags are vLLM's (dashed, e.g. ``--max-model-len``); ``normalize_argv`` also accepts the
underscore spelling (``--max_model_len``) that KServe-style container args tend to use.

* ``add_engine_args(parser)`` adds the flags; ``engine_args_from(ns)`` maps them onto
  ``engine.EngineArgs`` (the model comes from ``ns.model``).
* ``frontend_args_from(ns)`` gathers what the API server itself needs (served names, chat
  template, API key, task) into ``FrontendArgs``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import EngineArgs
from runtime.http_limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES

API_KEY_ENV = "VLMSERVE_API_KEY"
DTYPE_CHOICES = ["auto", "float32", "float", "fp32", "float16", "half", "fp16", "bfloat16", "bf16"]
TASK_CHOICES = ["generate", "embedding", "embed"]
POOLING_CHOICES = ["LAST", "MEAN", "CLS"]
MODALITIES = ("image", "video")
# Images per prompt when --limit-mm-per-prompt does not say: vLLM v1 allows 999, and each one is
# downloaded, decoded and encoded before the prompt can be refused for its length.
DEFAULT_IMAGES_PER_PROMPT = 8
GRACE_HELP = ("on SIGTERM, seconds in-flight requests may take to finish (default: 30); then streams end with "
              "an error event and [DONE], other requests get 503, gRPC streams an error response")

# EngineArgs fields set from flags of the same name (dest == field name).
_ENGINE_FIELDS = (
    "tokenizer", "revision", "dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "enable_chunked_prefill", "block_size", "enable_prefix_caching", "gpu_memory_utilization",
    "cpu_kv_cache_space", "num_gpu_blocks_override", "seed", "trust_remote_code", "attention_backend",
    "allowed_local_media_path", "max_image_bytes", "max_image_pixels", "max_request_image_pixels", "task",
    "pooling_type", "enforce_eager", "async_scheduling", "warmup_image_sizes", "allow_private_media_urls",
    "mm_processor_kwargs",
)


def parse_image_sizes(value: str) -> tuple[tuple[int, int], ...]:
    """``448x448,672x448`` (height x width) -> ((448, 448), (672, 448)); ``none`` or empty -> ()."""
    text = value.strip().lower()
    if text in ("", "none"):
        return ()
    sizes = []
    for part in text.split(","):
        h, sep, w = part.strip().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or not 0 < int(h) <= 8192 or not 0 < int(w) <= 8192:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not HEIGHTxWIDTH in pixels (e.g. 448x448)")
        sizes.append((int(h), int(w)))
    return tuple(sizes)


def parse_limit_mm_per_prompt(value: str) -> dict[str, int]:
    """``image=2,video=1`` or JSON ``{"image": 2}`` -> ``{"image": 2, "video": 1}`` (validated)."""
    text = value.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise argparse.ArgumentTypeError("the JSON form must be an object such as {\"image\": 2}")
        items = list(raw.items())
    else:
        items = []
        for part in text.split(","):
            key, sep, num = part.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"{part.strip()!r} is not MODALITY=COUNT (e.g. image=2,video=1)")
            items.append((key.strip(), num.strip()))
    limits: dict[str, int] = {}
    for key, num in items:
        if key not in MODALITIES:
            raise argparse.ArgumentTypeError(f"unknown modality {key!r}; expected one of {', '.join(MODALITIES)}")
        if key in limits:
            raise argparse.ArgumentTypeError(f"modality {key!r} is given twice")
        if isinstance(num, int) and not isinstance(num, bool) and num >= 0:
            limits[key] = num
        elif isinstance(num, str) and num.isdigit():
            limits[key] = int(num)
        else:
            raise argparse.ArgumentTypeError(f"{key}: the count must be a non-negative integer, got {num!r}")
    return limits


def parse_mm_processor_kwargs(value: str) -> dict[str, Any]:
    """vLLM's ``--mm-processor-kwargs`` JSON object, e.g. ``'{"use_fast": false}'`` (validated)."""
    from engine.mm_processors.qwen2_vl_fast import check_mm_processor_kwargs

    try:
        raw = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    try:
        return check_mm_processor_kwargs(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _bounded(cast: Callable[[str], Any], ok: Callable[[Any], bool],
             problem: Callable[[Any, str], str]) -> Callable[[str], Any]:
    """An argparse type: ``cast(value)``, refused with ``problem(parsed, value)`` unless ``ok``."""
    kind = "an integer" if cast is int else "a number"

    def parse(value: str) -> Any:
        try:
            x = cast(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {value!r}") from exc
        if not ok(x):
            raise argparse.ArgumentTypeError(problem(x, value))
        return x

    return parse


_positive_int = _bounded(int, lambda n: n > 0, lambda n, _: f"must be positive, got {n}")
_positive_float = _bounded(float, lambda x: 0.0 < x < float("inf"),
                           lambda _, v: f"must be a positive number, got {v!r}")
non_negative_int = _bounded(int, lambda n: n >= 0, lambda n, _: f"must not be negative, got {n}")
_fraction = _bounded(float, lambda x: 0.0 < x <= 1.0, lambda x, _: f"must be in (0, 1], got {x}")


def _domain_list(value: str) -> list[str]:
    return [d.strip() for d in value.split(",") if d.strip()]


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add vLLM-style engine and front-end flags to ``parser`` (defaults match EngineArgs)."""
    d = EngineArgs(model="")
    g = parser.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: the model's)")
    g.add_argument("--revision", default=None, help="hub revision of the model")
    g.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES,
                   help="weights/activations dtype; auto: the checkpoint's where the device supports it")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda[:i] | mlu[:i]")
    g.add_argument("--max-model-len", type=_positive_int, default=None, metavar="N",
                   help="context length (prompt + output); default: the model's")
    g.add_argument("--max-num-seqs", type=_positive_int, default=d.max_num_seqs, metavar="N",
                   help="most sequences scheduled in one step")
    g.add_argument("--max-num-batched-tokens", type=_positive_int, default=None, metavar="N",
                   help="token budget of one step")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=d.enable_chunked_prefill, help="split long prefills across steps")
    g.add_argument("--block-size", type=_positive_int, default=d.block_size, metavar="N",
                   help="tokens per KV-cache block (a power of two)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d.enable_prefix_caching, help="reuse KV blocks of shared prompt prefixes")
    g.add_argument("--gpu-memory-utilization", type=_fraction, default=d.gpu_memory_utilization, metavar="F",
                   help="fraction of device memory the engine may use")
    g.add_argument("--cpu-kv-cache-space", type=float, default=d.cpu_kv_cache_space, metavar="GIB",
                   help="GiB of KV cache when running on CPU")
    g.add_argument("--num-gpu-blocks-override", type=_positive_int, default=None, metavar="N",
                   help="fixed number of KV blocks (testing)")
    g.add_argument("--attention-backend", default=None, help="attention backend (default: the device's)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly (no CUDA graphs for decode-only steps)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d.async_scheduling,
                   help="launch the next decode step before this one's tokens reach the host (default: on)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom code from the model folder")
    g.add_argument("--task", default="generate", choices=TASK_CHOICES,
                   help="what the model serves: generate (chat/completions) or embedding (/v1/embeddings)")
    g.add_argument("--pooling-type", default=None, type=str.upper, choices=POOLING_CHOICES,
                   help="embedding pooling over the prompt's last hidden states (default: LAST)")
    g.add_argument("--limit-mm-per-prompt", type=parse_limit_mm_per_prompt, default=None, metavar="SPEC",
                   help="most multimodal items per prompt: image=2,video=1 or JSON '{\"image\": 2}' "
                        f"(default: image={DEFAULT_IMAGES_PER_PROMPT}); more -> 400")
    g.add_argument("--mm-processor-kwargs", type=parse_mm_processor_kwargs, default=None, metavar="JSON",
                   help="vLLM's: '{\"use_fast\": false}' reproduces HF's PIL image processor, true its fast "
                        "(torchvision) one (default: the one HF picks here: fast where torchvision is installed)")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="folder from which file:// media may be read (default: none)")
    g.add_argument("--allowed-media-domains", type=_domain_list, nargs="+", default=None, metavar="DOMAIN",
                   help="domains media URLs may come from (default: any)")
    # default None, not False: without the flag, the environment variable decides (engine.media).
    g.add_argument("--allow-private-media-urls", action="store_true", default=None,
                   help="fetch media URLs whose host is or resolves to a loopback, private, link-local or other "
                        "non-public address, e.g. internal image hosts (default: refused; also "
                        "VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS=1)")
    g.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024, metavar="N",
                   help="largest encoded image accepted, in bytes (default: 20 MiB); larger -> 413")
    g.add_argument("--max-image-pixels", type=_positive_int, default=d.max_image_pixels, metavar="N",
                   help="largest decoded image accepted, width * height (default: 6144*6144); larger -> 413")
    g.add_argument("--max-request-image-pixels", type=_positive_int, default=d.max_request_image_pixels,
                   metavar="N", help="most decoded pixels of all the images of one request together "
                                     "(default: 8192*8192); more -> 413")
    g.add_argument("--warmup-image-sizes", type=parse_image_sizes, default=d.warmup_image_sizes, metavar="HxW,...",
                   help="CUDA: image sizes whose vision passes (1 to a step's worth of images) are captured "
                        "before the server reports ready (default: 448x448; 'none' to skip)")

    f = parser.add_argument_group("front end")
    f.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="name(s) the model answers to in the API; the first is the primary one")
    f.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template file (or inline template) used instead of the model's")
    f.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on API routes (default: ${API_KEY_ENV} if set; "
                        "the variable keeps the key out of the process list)")
    f.add_argument("--max-request-body-bytes", type=_positive_int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help="largest HTTP request body, in bytes, also once a gzip/deflate v2 body is inflated "
                        "(default: 64 MiB); larger -> 413")
    f.add_argument("--api-server-count", type=_positive_int, default=1, metavar="N",
                   help="API server processes sharing the engine core and the ports (default: 1); more "
                        "parse, decode images and stream tokens in parallel")
    f.add_argument("--request-body-timeout", type=_positive_float, default=DEFAULT_BODY_TIMEOUT_S, metavar="S",
                   help="seconds a client may take to send a request body (default: 30); slower -> 408")
    return parser


def normalize_argv(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Rewrite ``--foo_bar[=v]`` to ``--foo-bar[=v]``, and ``--foo-bar`` to ``--foo_bar``, where
    only the other spelling is a flag of ``parser``: every flag takes both spellings (vLLM's are
    dashed, KServe's ``--model_name`` style ones underscored)."""
    known = set(parser._option_string_actions)
    out = []
    for arg in argv:
        if arg.startswith("--") and arg != "--":
            name, sep, value = arg.partition("=")
            if name not in known:
                for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                    if other in known:
                        arg = other + sep + value
                        break
        out.append(arg)
    return out


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """``EngineArgs`` for ``ns.model`` from parsed flags (see ``add_engine_args``)."""
    kwargs = {name: getattr(ns, name) for name in _ENGINE_FIELDS if hasattr(ns, name)}
    names = getattr(ns, "served_model_name", None)
    media_path = getattr(ns, "allowed_local_media_path", None)
    if media_path is not None and not Path(media_path).is_dir():
        raise ValueError(f"--allowed-local-media-path: {media_path} is not a folder")
    args = EngineArgs(
        model=str(ns.model),
        served_model_name=names[0] if names else None,
        limit_mm_per_prompt={"image": DEFAULT_IMAGES_PER_PROMPT, **(getattr(ns, "limit_mm_per_prompt", None) or {})},
        allowed_media_domains=_flat_domains(getattr(ns, "allowed_media_domains", None)),
        **kwargs,
    )
    args.validate()
    return args


def _flat_domains(groups: list[Any] | None) -> list[str] | None:
    if groups is None:
        return None
    return [d for group in groups for d in (group if isinstance(group, list) else [group])]


@dataclass
class FrontendArgs:
    """What the API server needs beyond the engine (media limits and allow-lists are engine args:
    the engine's processor loads and checks media)."""

    served_model_names: list[str] = field(default_factory=list)
    chat_template: str | None = None  # the template text (read from --chat-template FILE)
    api_key: str | None = None
    task: str = "generate"
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    api_server_count: int = 1


def load_chat_template(value: str | None) -> str | None:
    """The template text of ``--chat-template``: a file's content, or the value itself when it is
    an inline Jinja template. Raises ValueError for a missing file."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: {value} is not a file (nor an inline Jinja template)")


def frontend_args_from(ns: argparse.Namespace) -> FrontendArgs:
    """``FrontendArgs`` from parsed flags; the API key falls back to ``$VLMSERVE_API_KEY``."""
    return FrontendArgs(
        served_model_names=list(getattr(ns, "served_model_name", None) or []),
        chat_template=load_chat_template(getattr(ns, "chat_template", None)),
        api_key=getattr(ns, "api_key", None) or os.environ.get(API_KEY_ENV) or None,
        task="embedding" if getattr(ns, "task", "generate") in ("embed", "embedding") else "generate",
        max_request_body_bytes=getattr(ns, "max_request_body_bytes", DEFAULT_MAX_BODY_BYTES),
        request_body_timeout=getattr(ns, "request_body_timeout", DEFAULT_BODY_TIMEOUT_S),
        api_server_count=getattr(ns, "api_server_count", 1),
    )
