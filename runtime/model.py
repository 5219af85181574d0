"""``VLMModel``: the KServe model class over our async engine (the "engine client").

Lifecycle (KServe's hooks): ``start_engine()`` runs in the server's event loop once the HTTP
server listens: it builds the ``AsyncLLM`` in a worker thread (``load()``), warms it with one
short generation and only then sets ``ready``. ``stop()`` shuts the engine down.

What the protocol dataplanes (OpenAI now; v2 infer / gRPC streaming later) use:

* ``render_chat(messages)`` / ``encode_text(text)`` -> ``EnginePrompt`` (remote images are
  fetched asynchronously first; template, image decoding and tokenisation run in worker
  threads, off the event loop; image preprocessing itself runs in the engine's ``process``,
  also off the loop)
* ``generate(prompt, params, request_id, kind)`` -> async iterator of ``RequestOutput``
* ``max_model_len``, ``stats``, ``served_names``

Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import EngineArgs
from engine.output_processor import OutputKind
from engine.outputs import PoolingRequestOutput, RequestOutput
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams
from runtime._kserve import kserve

logger = logging.getLogger("vlmserve.model")

MAX_CONCURRENT_FETCHES = 64  # remote image downloads in flight, all requests together


class PromptError(ValueError):
    """The request's prompt cannot be served (bad content, too long, no chat template).

    ``param`` names the request field at fault; ``code`` is an OpenAI-style error code."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class EnginePrompt:
    """A prompt ready for the engine: its text (if any), its token ids (before any image
    placeholder expansion) and its multimodal data (loaded images), if any."""

    text: str | None
    token_ids: list[int]
    multi_modal_data: dict[str, Any] | None = None

    def to_engine(self) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": self.token_ids}
        if self.text is not None:
            prompt["prompt"] = self.text
        if self.multi_modal_data:
            prompt["multi_modal_data"] = self.multi_modal_data
        return prompt


def flatten_text_content(msg: dict[str, Any]) -> dict[str, Any]:
    """A message whose content is only {"type": "text"} parts gets them as one string (joined by
    newlines, as vLLM does), so string-only chat templates work; other content is left to the
    engine's chat parser (``engine.chat``), which loads images."""
    content = msg.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return dict(msg, content="\n".join(str(p.get("text", "")) for p in content))
    return msg


class VLMModel(kserve.Model):
    """One served model: a KServe ``Model`` that owns an ``AsyncLLM``."""

    def __init__(
        self,
        name: str,
        engine_args: EngineArgs,
        *,
        served_names: Sequence[str] = (),
        chat_template: str | None = None,
        engine_factory: Callable[[EngineArgs], Any] | None = None,
    ) -> None:
        super().__init__(name)
        self.engine = True  # KServe: this model has an engine; ModelServer runs start_engine()
        self.engine_args = engine_args
        self.served_names = list(dict.fromkeys([name, *served_names]))
        self.chat_template = chat_template
        self._engine_factory = engine_factory
        self.llm: Any = None  # engine.async_llm.AsyncLLM once loaded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._media_loader: Any = None
        # Templating, tokenisation and image decoding run here, never on the event loop. Remote
        # images are fetched before (``_prefetch_images``), never in these workers: a slow host
        # would hold one for the whole fetch timeout and queue everyone's tokenisation behind it.
        workers = max(2, min(8, os.cpu_count() or 2))
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="vlmserve-prompt")
        # Fetches in flight across all requests (sockets, buffers up to max_image_bytes each);
        # waiting for a slot counts against the fetch's own deadline.
        self._fetch_slots = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """KServe calls this at registration; readiness comes from ``start_engine`` instead."""

    async def start_engine(self) -> None:
        """Load and warm the engine without blocking the server's event loop; then ready."""
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self.load)

    def load(self) -> bool:
        """Start the AsyncLLM (blocking) and warm it with one short generation; then ready.

        Called from a worker thread by ``start_engine`` while the server runs (the warm-up then runs
        on the server's loop), or directly before the server starts."""
        if self.llm is None:
            from engine.media import MediaLoader

            self._media_loader = MediaLoader(self.engine_args.media_config())
            factory = self._engine_factory
            if factory is None:
                from engine.async_llm import AsyncLLM as factory
            llm = factory(self.engine_args)
            with self._lock:
                if self._stopped:  # stopped while loading
                    llm.shutdown()
                    return False
                self.llm = llm
        if self.chat_template is None and not getattr(self.llm.tokenizer, "chat_template", None):
            logger.warning("model %s has no chat template and no --chat-template was given: "
                           "/v1/chat/completions will answer 400", self.name)
        loop = self._loop
        if loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(self._warm_up(), loop).result()
        else:
            asyncio.run(self._warm_up())
        with self._lock:
            self.ready = not self._stopped
        if self.ready:
            logger.info("model %s is ready (max_model_len %d)", self.name, self.max_model_len)
        return self.ready

    async def _warm_up(self) -> None:
        ids = self.llm.tokenizer("Hello", add_special_tokens=False).input_ids or [0]
        rid = f"vlmserve-warmup-{os.getpid()}"  # API server processes sharing a core warm up at once
        if self.is_embedding:
            async for _ in self.llm.encode({"prompt_token_ids": ids}, PoolingParams(), rid):
                pass
            return
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        async for _ in self.llm.generate({"prompt_token_ids": ids}, params, rid, OutputKind.FINAL_ONLY):
            pass

    async def healthy(self) -> bool:
        return bool(self.ready and self.llm is not None and self.llm.is_running)

    def stop(self) -> None:
        """Not ready any more; shut the engine down (idempotent: KServe calls it per name)."""
        self.ready = False
        with self._lock:
            self._stopped = True
            llm, self.llm = self.llm, None
        if llm is not None:
            logger.info("stopping the engine of model %s", self.name)
            llm.shutdown()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def stop_engine(self) -> None:
        self.stop()

    # -- engine client ---------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.llm.config.scheduler.max_model_len

    @property
    def is_embedding(self) -> bool:
        """Served with --task embedding: /v1/embeddings and v2 ``embedding`` instead of generation."""
        return self.engine_args.task in ("embed", "embedding")

    @property
    def embedding_size(self) -> int:
        """The model's embedding (hidden) size; -1 before the engine is loaded."""
        llm = self.llm
        return llm.config.model.hidden_size if llm is not None else -1

    @property
    def stats(self) -> Any:
        """The engine's latest ``EngineStats`` (None before load and after stop)."""
        llm = self.llm
        return llm.stats if llm is not None else None

    # -- checks shared by every route (OpenAI, v2 REST and gRPC): one answer for one input ------
    def check_prompt_length(self, prompt: EnginePrompt, max_tokens: int | None, what: str) -> None:
        """The prompt must leave room for ``max_tokens`` (None: whatever is left) within
        max_model_len. ``what`` names the prompt's field; ``PromptError`` otherwise."""
        limit, n = self.max_model_len, len(prompt.token_ids)
        if n == 0:
            raise PromptError(f"{what}: the prompt is empty after tokenisation", what)
        if n >= limit:
            raise PromptError(
                f"{what}: the prompt is {n} tokens long, but this model's maximum context length "
                f"(max_model_len) is {limit} tokens, and at least one token must be left for the "
                "completion; shorten the prompt", what, "context_length_exceeded")
        if max_tokens is not None and n + max_tokens > limit:
            raise PromptError(
                f"max_tokens: this model's maximum context length (max_model_len) is {limit} tokens, but "
                f"{n + max_tokens} were requested ({n} in the {what}, {max_tokens} in the completion); "
                "reduce the length of the prompt or max_tokens", "max_tokens", "context_length_exceeded")

    def check_image_count(self, count: int, what: str) -> None:
        """Refuse more images than the model takes per prompt (``--limit-mm-per-prompt``) before
        any is downloaded or decoded; ``PromptError`` naming ``what``."""
        if not count:
            return
        mm = getattr(self.llm.processor, "mm_processor", None)
        if mm is None or not mm.image_placeholder_text:
            raise PromptError(f"{what}: {count} image(s) were given but the model `{self.name}` takes text only",
                              what, "too_many_images")
        limit = mm.limits.get("image")
        if limit is not None and count > limit:
            raise PromptError(f"{what}: {count} images were given but at most {limit} image(s) may be provided "
                              f"in one prompt (--limit-mm-per-prompt image={limit})", what, "too_many_images")

    def check_video_count(self, count: int, what: str) -> None:
        """``check_image_count`` for videos (``video_url`` parts)."""
        if not count:
            return
        mm = getattr(self.llm.processor, "mm_processor", None)
        if mm is None or not mm.video_placeholder_text:
            raise PromptError(f"{what}: {count} video(s) were given but the model `{self.name}` takes no video",
                              what, "too_many_videos")
        limit = mm.limits.get("video")
        if limit is not None and count > limit:
            raise PromptError(f"{what}: {count} videos were given but at most {limit} video(s) may be provided "
                              f"in one prompt (--limit-mm-per-prompt video={limit})", what, "too_many_videos")

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template or getattr(self.llm.tokenizer, "chat_template", None))

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> EnginePrompt:
        """Fetch any http(s) images (async, ``_prefetch_images``), then apply the chat template
        (``--chat-template`` or the model's), decode the images and tokenise, in a worker thread.
        Errors are ValueErrors naming the field (``MediaError`` carries its HTTP status)."""
        if not self.has_chat_template:
            raise PromptError(
                f"model {self.name!r} has no chat template and the server was started without "
                "--chat-template; use /v1/completions or restart with --chat-template FILE",
                param="messages", code="chat_template_missing")
        conv = [flatten_text_content(m) for m in messages]
        loader = (await self._prefetch_images(conv)).for_request()

        def work() -> EnginePrompt:
            try:
                p = self.llm.processor.chat_prompt(conv, loader, self.chat_template, add_generation_prompt)
            except ValueError:
                raise
            except Exception as exc:  # a template error (jinja raise_exception, missing key...)
                raise PromptError(f"messages: the chat template failed: {exc}", param="messages") from exc
            return EnginePrompt(p.get("prompt"), list(p["prompt_token_ids"]), p.get("multi_modal_data"))

        return await self._in_pool(work)

    async def _prefetch_images(self, conv: list[dict[str, Any]]) -> Any:
        """Fetch the conversation's http(s) images here, concurrently on the event loop, each
        within the fetch timeout: a slow host then holds neither a prompt worker nor anyone
        else's request. Returns the loader the prompt worker uses (it only decodes)."""
        from engine.chat import remote_image_urls

        refs = remote_image_urls(conv)
        if not refs:
            return self._media_loader
        fetched = await self._media_loader.fetch_all_async(refs, self._fetch_slots)
        return self._media_loader.with_prefetched(fetched)

    async def encode_text(self, text: str, add_special_tokens: bool = True) -> EnginePrompt:
        """Tokenise a completion prompt (with the tokenizer's special tokens, e.g. BOS, by default)."""
        return await self._in_pool(lambda: EnginePrompt(
            text, self.llm.processor.encode(text, add_special_tokens=add_special_tokens)))

    def encode_token_ids(self, token_ids: list[int]) -> EnginePrompt:
        vocab = self.llm.processor.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise PromptError(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="prompt")
        return EnginePrompt(None, list(token_ids))

    async def encode_text_with_images(self, text: str, images: Sequence[bytes]) -> EnginePrompt:
        """A v2 prompt: ``text`` plus encoded images (decoded with the media loader's bounds). With
        images, the model's placeholder (one per image) goes in front of a text that has none;
        a text-only model rejects images (``PromptError`` naming ``image``)."""
        if not images:
            return await self.encode_text(text)

        self.check_image_count(len(images), "image")
        loader = self._media_loader.for_request()

        def work() -> EnginePrompt:
            mm = self.llm.processor.mm_processor
            loaded = [loader.decode_image(data, f"image[{i}]") for i, data in enumerate(images)]
            have = text.count(mm.image_placeholder_token)
            prompt = text
            if have == 0:
                prompt = "".join(mm.image_placeholder(i + 1) for i in range(len(loaded))) + text
            elif have != len(loaded):
                raise PromptError(f"image: text_input has {have} image placeholders for {len(loaded)} images",
                                  param="image")
            return EnginePrompt(prompt, self.llm.processor.encode(prompt), {"image": loaded})

        return await self._in_pool(work)

    async def _in_pool(self, fn: Callable[[], EnginePrompt]) -> EnginePrompt:
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn)

    def generate(
        self, prompt: EnginePrompt, params: SamplingParams, request_id: str, kind: OutputKind
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; closing the iterator (or cancelling) aborts it."""
        if self.llm is None:
            raise RuntimeError(f"model {self.name} is not loaded")
        return self.llm.generate(prompt.to_engine(), params, request_id, kind)

    def encode(self, prompt: EnginePrompt, params: PoolingParams,
               request_id: str) -> AsyncIterator[PoolingRequestOutput]:
        """Embed the prompt (an embedding model): one final output; closing the iterator aborts it."""
        if self.llm is None:
            raise RuntimeError(f"model {self.name} is not loaded")
        return self.llm.encode(prompt.to_engine(), params, request_id)

    # -- KServe v2 metadata (the Open Inference Protocol for LLMs; served by runtime.v2_*) ---------
    def get_input_types(self) -> list[dict[str, Any]]:
        if self.is_embedding:
            return [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
        return [
            {"name": "text_input", "datatype": "BYTES", "shape": [1]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "stream", "datatype": "BOOL", "shape": [1]},
            {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1]},
            {"name": "exclude_input_in_output", "datatype": "BOOL", "shape": [1]},
        ]

    def get_output_types(self) -> list[dict[str, Any]]:
        if self.is_embedding:
            return [{"name": "embedding", "datatype": "FP32", "shape": [-1, self.embedding_size]}]
        return [
            {"name": "text_output", "datatype": "BYTES", "shape": [-1]},
            {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]},
            {"name": "num_input_tokens", "datatype": "INT32", "shape": [1]},
            {"name": "num_output_tokens", "datatype": "INT32", "shape": [-1]},
        ]

    async def predict(self, payload: Any, headers: dict[str, str] | None = None, response_headers: Any = None) -> Any:
        # v2 infer / generate / gRPC are served by runtime.v2_routes and runtime.v2_grpc, which
        # take these paths before KServe's; nothing reaches KServe's predict path.
        raise NotImplementedError("v2 inference is served by vlmserve's own v2 routes")
