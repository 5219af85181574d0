"""Output processing in the front end: incremental detokenisation, stop strings, logprob
decoding, and folding the n samples of a request into one ``RequestOutput``.

Token-level stops (EOS, stop_token_ids, max_tokens) are decided in the engine core; stop
*strings* need text, so they are found here, and the request is then aborted in the core.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from engine.engine_core import EngineCoreOutput
from engine.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    Logprob,
    PoolingRequestOutput,
    PositionLogprobs,
    RequestError,
    RequestOutput,
)
from engine.sampling_params import SamplingParams


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output carries all text so far
    DELTA = "delta"  # every output carries only what is new (streaming)
    FINAL_ONLY = "final_only"  # one output when the request finishes


class IncrementalDetokenizer:
    """New text for each new token; uses the fast tokenizer's DecodeStream when there is one."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool, deferred: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        # deferred: nobody reads the text before the end (a final-only output without stop
        # strings): collect ids, decode once in flush() instead of a stream step per token.
        self.deferred = deferred
        backend = getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        if backend is not None and not deferred:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        if self.deferred:
            return ""
        if self._stream is not None:
            piece = self._stream.step(self._backend, token_id) or ""
        else:  # slow tokenizer: decode everything and diff (correct, quadratic)
            full = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip)
            piece = full[len(self.text) :] if not full.endswith("\ufffd") else ""
        self.text += piece
        return piece

    def flush(self, full: str | None = None) -> str:
        """At the end: emit what the stream held back (an incomplete UTF-8 tail decodes to U+FFFD).
        ``full``: the decoded text of all the ids, when the caller decoded it already."""
        if full is None:
            full = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip)
        piece = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += piece
        return piece


def flush_all(detoks: list[IncrementalDetokenizer]) -> None:
    """``flush()`` each of them, decoding together what can be: when a whole batch of final-only
    requests ends in one step (offline ``generate``), one ``decode_batch`` of the fast tokenizer's
    backend (Rust, on every core) instead of one Python-wrapped ``decode`` each, which took 55 ms
    for W1's 512 x 128 tokens here against 25 for the batch on 2 cores. Same text: the backend is
    what ``decode`` calls, and tokenizers that clean up spaces after it keep the per-request path."""
    if not detoks:
        return
    tok = detoks[0].tokenizer
    backend = getattr(tok, "_tokenizer", None)
    if len(detoks) == 1 or backend is None or getattr(tok, "clean_up_tokenization_spaces", False):
        for d in detoks:
            d.flush()
        return
    for skip in (False, True):
        group = [d for d in detoks if d.skip == skip]
        if group:
            for d, text in zip(group, backend.decode_batch([d.token_ids for d in group], skip_special_tokens=skip)):
                d.flush(text)


@dataclass
class _SeqState:
    index: int
    detok: IncrementalDetokenizer
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_text: int = 0  # chars already delivered (DELTA)
    sent_tokens: int = 0
    finish_sent: bool = False  # DELTA: the finish_reason went out once; later updates skip this seq


@dataclass
class _ReqState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    kind: OutputKind
    seqs: dict[str, _SeqState]  # child request id -> state
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    num_finished: int = 0  # seqs with a finish_reason

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _ReqState] = {}
        self.child_to_parent: dict[str, str] = {}
        self.pooling: dict[str, tuple[str | None, list[int]]] = {}  # request id -> (prompt, prompt ids)

    def add_pooling_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int]) -> None:
        """A pooling request: one final PoolingRequestOutput (or a RequestError) comes out."""
        self.pooling[request_id] = (prompt, list(prompt_token_ids))

    def _pooling_output(self, out: EngineCoreOutput) -> PoolingRequestOutput | RequestError | None:
        prompt, ids = self.pooling.pop(out.request_id)
        if out.pooled is None:  # aborted
            return None
        import torch

        vec = out.pooled
        if not bool(torch.isfinite(vec).all()):
            # NaN / inf cannot be written as JSON (and mean a broken model or overflow): an error.
            return RequestError(out.request_id, "the model produced a non-finite embedding (NaN or inf); "
                                "try another dtype (e.g. float32)")
        return PoolingRequestOutput(out.request_id, ids, EmbeddingOutput(vec.tolist()), True, prompt,
                                    out.num_cached_tokens)

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
        child_params: dict[str, SamplingParams], kind: OutputKind,
    ) -> None:
        seqs = {}
        for i, (child_id, params) in enumerate(child_params.items()):
            deferred = kind == OutputKind.FINAL_ONLY and not params.stop
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, deferred)
            seqs[child_id] = _SeqState(i, detok, params, logprobs=[] if params.logprobs is not None else None,
                                       cumulative_logprob=0.0 if params.logprobs is not None else None)
            self.child_to_parent[child_id] = request_id
        self.requests[request_id] = _ReqState(request_id, prompt, list(prompt_token_ids), kind, seqs)

    def child_ids(self, request_id: str) -> list[str]:
        if request_id in self.pooling:
            return [request_id]
        state = self.requests.get(request_id)
        return list(state.seqs) if state else []

    def abort(self, request_id: str) -> None:
        self.pooling.pop(request_id, None)
        state = self.requests.pop(request_id, None)
        for child in state.seqs if state else ():
            self.child_to_parent.pop(child, None)

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[Any], list[str]]:
        """Apply core outputs; returns (outputs to deliver: RequestOutput, PoolingRequestOutput or
        RequestError, child ids to abort in the core)."""
        touched: dict[str, _ReqState] = {}
        to_abort: list[str] = []
        ready: list = []
        ending: list[IncrementalDetokenizer] = []  # flushed together below
        for out in outputs:
            if out.request_id in self.pooling:
                result = self._pooling_output(out)
                if result is not None:
                    ready.append(result)
                continue
            parent = self.child_to_parent.get(out.request_id)
            if parent is None:
                continue  # already finished or aborted here
            state = self.requests[parent]
            seq = state.seqs[out.request_id]
            if seq.finish_reason is not None:
                continue
            if out.prompt_logprobs is not None and state.prompt_logprobs is None:
                state.prompt_logprobs = [None if p is None else self._decode_lp(p) for p in out.prompt_logprobs]
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            self._apply(seq, out, ending)
            if seq.finish_reason is not None:
                state.num_finished += 1
                if out.finish_reason is None:
                    to_abort.append(out.request_id)  # a stop string ended it: the core must drop it too
            touched[parent] = state
        flush_all(ending)
        for rid, state in touched.items():
            if state.kind is OutputKind.FINAL_ONLY and not state.finished:
                continue
            ro = self._make_output(state)
            if ro is not None:
                ready.append(ro)
            if state.finished:
                self.abort(rid)
        return ready, to_abort

    def _apply(self, seq: _SeqState, out: EngineCoreOutput, ending: list[IncrementalDetokenizer]) -> None:
        """Add one core output's tokens to ``seq``; a seq that ends here has its detokenizer put on
        ``ending``, for the caller to flush with the others that end in the same step."""
        params = seq.params
        # A token-level stop (EOS, stop_token_ids) keeps its id but not its text, as in vLLM.
        stopped_on_token = out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
        hide_last = stopped_on_token and not params.include_stop_str_in_output
        for i, token in enumerate(out.new_token_ids):
            seq.token_ids.append(token)
            if not (hide_last and i == len(out.new_token_ids) - 1):
                seq.detok.add(token)
            if out.new_logprobs is not None and seq.logprobs is not None:
                entry = self._decode_lp(out.new_logprobs[i])
                seq.logprobs.append(entry)
                seq.cumulative_logprob += entry[token].logprob
        if params.stop and seq.finish_reason is None:
            self._check_stop_strings(seq)
        if seq.finish_reason is None and out.finish_reason is not None:
            ending.append(seq.detok)
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason

    def _check_stop_strings(self, seq: _SeqState) -> None:
        if len(seq.token_ids) < seq.params.min_tokens:
            return  # stop strings count only once min_tokens are out, as in vLLM
        text = seq.detok.text
        # Only the tail can hold a new match: the text added this step plus the longest stop - 1.
        window = max(len(s) for s in seq.params.stop) + len(text) - seq.sent_text
        start = max(0, len(text) - window)
        best = None
        for s in seq.params.stop:
            pos = text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            seq.detok.text = text[: pos + len(s)] if seq.params.include_stop_str_in_output else text[:pos]
            seq.finish_reason, seq.stop_reason = "stop", s

    def _decode_lp(self, entries: list) -> PositionLogprobs:
        result: PositionLogprobs = {}
        for token, logprob, rank in entries:
            if token not in result:
                result[token] = Logprob(logprob, rank, self.tokenizer.decode([token]))
        return result

    def _make_output(self, state: _ReqState) -> RequestOutput | None:
        if state.kind == OutputKind.FINAL_ONLY and not state.finished:
            return None
        delta = state.kind == OutputKind.DELTA
        completions = []
        for seq in sorted(state.seqs.values(), key=lambda s: s.index):
            text, ids, lps = seq.detok.text, seq.token_ids, seq.logprobs
            if delta:
                if seq.finish_sent:
                    continue
                seq.finish_sent = seq.finish_reason is not None
                text, ids = text[seq.sent_text :], ids[seq.sent_tokens :]
                lps = lps[seq.sent_tokens :] if lps is not None else None
                seq.sent_text, seq.sent_tokens = len(seq.detok.text), len(seq.token_ids)
                if not text and not ids and seq.finish_reason is None:
                    continue
            completions.append(CompletionOutput(seq.index, text, list(ids), seq.cumulative_logprob, lps,
                                                seq.finish_reason, seq.stop_reason))
        if delta and not completions:
            return None
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions, state.finished,
                             state.prompt_logprobs, state.num_cached_tokens)
