"""Turns a step's logits into next tokens: penalties, min_tokens, temperature, top-k/top-p/min-p,
per-request seeded sampling, and top-k logprobs of the raw distribution (vLLM's default)."""

from __future__ import annotations

import itertools

from dataclasses import dataclass

import torch

from engine.device import to_device_async
from engine.request import Request

# One (token_id, logprob, rank) triple; rank is 1 for the most likely token.
TokenLogprob = tuple[int, float, int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: the sampled token's entry first, then the top-k; None when not requested.
    logprobs: list[list[TokenLogprob] | None]


def topk_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[list[TokenLogprob]]:
    """logprobs: [M, V] log-softmax; token_ids: [M] -> per row [(chosen), top-1, ..., top-k]."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [M, 1]
    ranks = (logprobs > chosen).sum(-1) + 1  # [M]
    ids_l, chosen_l, ranks_l = token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist()
    if k > 0:
        top_vals, top_ids = logprobs.topk(k, dim=-1)
        vals_l, tids_l = top_vals.tolist(), top_ids.tolist()
    else:
        vals_l = tids_l = [[] for _ in ids_l]
    rows = []
    for r in range(len(ids_l)):
        row = [(ids_l[r], chosen_l[r], ranks_l[r])]
        row += [(t, v, i + 1) for i, (t, v) in enumerate(zip(tids_l[r], vals_l[r]))]
        rows.append(row)
    return rows


def _h2d(data, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A host list -> tensor on ``device`` without a host sync: from pinned memory, asynchronously
    (a copy from pageable memory would wait for the work queued before it: the whole forward)."""
    return to_device_async(torch.tensor(data, dtype=dtype), device)


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        # Unseeded requests draw from the engine's generator (seeded by LLM(seed=...)).
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        """A generator of a seeded request; a seed torch refuses raises ValueError naming it."""
        try:
            return torch.Generator(device=self.device).manual_seed(seed)
        except (ValueError, RuntimeError, OverflowError) as exc:  # torch: "Overflow when unpacking long long"
            raise ValueError(f"seed: cannot seed a generator with {seed!r} ({exc})") from None

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        # logits: [M, V] fp32 or the model dtype (see sample), row r belongs to reqs[r]
        token_ids, logprobs = self.sample(logits, reqs)
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[torch.Tensor, list[list[TokenLogprob] | None]]:
        """Next tokens left on the device (token_ids: [M] int64, no host sync unless logprobs are
        asked for) and the per-row logprobs."""
        # logits: [M, V] fp32, or the model's dtype when every row is greedy-ready: argmax of the
        # half-precision values picks what argmax of their (exact) fp32 copies picks, so a greedy
        # batch skips the [M, V] upcast; anything that computes with the logits upcasts first.
        num_rows = logits.shape[0]
        params = [r.params for r in reqs]
        want_lp = [p.logprobs for p in params]
        any_lp = any(k is not None for k in want_lp)
        sample_rows = [r for r, p in enumerate(params) if not p.greedy]
        if (any_lp or sample_rows) and logits.dtype != torch.float32:
            logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any_lp else None
        logits = self._apply_penalties(logits, reqs)

        token_ids = logits.argmax(dim=-1)
        if sample_rows:
            if len(sample_rows) == num_rows:
                token_ids = self._sample(logits, reqs)
            else:
                idx = _h2d(sample_rows, torch.long, logits.device)
                sampled = self._sample(logits.index_select(0, idx), [reqs[r] for r in sample_rows])
                token_ids = token_ids.index_copy(0, idx, sampled)

        logprobs: list[list[TokenLogprob] | None] = [None] * num_rows
        if raw_logprobs is not None:
            k = max(k for k in want_lp if k is not None)
            rows = topk_logprobs(raw_logprobs, token_ids, k)
            for r, kr in enumerate(want_lp):
                if kr is not None:
                    logprobs[r] = rows[r][: 1 + kr]
        return token_ids, logprobs

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Repetition / frequency / presence penalties and min_tokens stop-id masking, batched over
        the rows that need them (no per-row kernels, no host syncs)."""
        pen_rows: list[int] = []
        min_rows: list[int] = []
        min_cols: list[int] = []
        vocab = logits.shape[1]
        # runs for every row of every step (512 rows in a big decode batch): kept to cheap tests
        for r, req in enumerate(reqs):
            p = req.params
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0:
                pen_rows.append(r)
            # A token sampled by a step still in flight counts (async scheduling).
            if p.min_tokens and len(req.output_token_ids) + req.num_pending_tokens < p.min_tokens:
                stops = p._all_stop_token_ids
                min_rows.extend(itertools.repeat(r, len(stops)))
                min_cols.extend(stops)
        if min_cols and max(min_cols) >= vocab:  # stop ids past the logits' width never sample
            keep = [i for i, t in enumerate(min_cols) if t < vocab]
            min_rows, min_cols = [min_rows[i] for i in keep], [min_cols[i] for i in keep]
        if not pen_rows and not min_rows:
            return logits
        # In place: the logits are this step's own (raw logprobs, if asked for, are taken already).
        dev = logits.device
        if pen_rows:
            logits = logits.float()  # a no-op on fp32 logits
            self._penalise(logits, [reqs[r] for r in pen_rows], pen_rows)
        if min_rows:
            # One scatter of -inf at every (row, stop id) pair of the rows still below min_tokens.
            idx = _h2d([min_rows, min_cols], torch.long, dev)
            # the fill value made on the device: a Python scalar would be copied from pageable
            # memory, a host sync that would wait for the whole forward
            logits.index_put_((idx[0], idx[1]), torch.full((), float("-inf"), dtype=logits.dtype, device=dev))
        return logits

    @staticmethod
    def _penalise(logits: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
        dev, vocab = logits.device, logits.shape[1]
        m = len(rows)
        # Output-token counts of each row: scatter_add over a [m, max_len] tensor padded with an
        # id one past the vocabulary (a dropped extra column).
        outs = [req.output_token_ids for req in reqs]
        width = max(1, max(len(o) for o in outs))
        pad = torch.full((m, width), vocab, dtype=torch.long)
        for i, o in enumerate(outs):
            if o:
                pad[i, : len(o)] = torch.as_tensor(o, dtype=torch.long)
        pad = to_device_async(pad, dev)
        counts = torch.zeros((m, vocab + 1), dtype=logits.dtype, device=dev)
        counts.scatter_add_(1, pad, torch.ones(pad.shape, dtype=logits.dtype, device=dev))
        counts = counts[:, :vocab]
        row_idx = _h2d(rows, torch.long, dev)
        sub = logits.index_select(0, row_idx)  # [m, V]
        ps = [req.params for req in reqs]
        rep_rows = [i for i, p in enumerate(ps) if p.repetition_penalty != 1.0]
        if rep_rows:
            prompts = [reqs[i].prompt_token_ids for i in rep_rows]
            pw = max(1, max(len(t) for t in prompts))
            ppad = torch.full((m, pw), vocab, dtype=torch.long)
            for i, t in zip(rep_rows, prompts):
                if t:
                    ppad[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
            seen = torch.zeros((m, vocab + 1), dtype=torch.bool, device=dev)
            seen.scatter_(1, to_device_async(ppad, dev), True)
            seen = seen[:, :vocab] | (counts > 0)
            rp_vals = {ps[i].repetition_penalty for i in rep_rows}
            if len(rp_vals) == 1:
                rp = rp_vals.pop()  # a Python scalar, as the per-row code used
                penalised = torch.where(sub > 0, sub / rp, sub * rp)
            else:
                rp = _h2d([p.repetition_penalty for p in ps], sub.dtype, dev)[:, None]
                penalised = torch.where(sub > 0, sub / rp, sub * rp)
            if len(rep_rows) < m:
                has_rep = _h2d([p.repetition_penalty != 1.0 for p in ps], torch.bool, dev)[:, None]
                seen &= has_rep
            sub = torch.where(seen, penalised, sub)
        freq = [p.frequency_penalty for p in ps]
        pres = [p.presence_penalty for p in ps]
        if any(f != 0.0 for f in freq) or any(q != 0.0 for q in pres):
            if len(set(freq)) == 1 and len(set(pres)) == 1:
                sub = sub - (freq[0] * counts + pres[0] * (counts > 0).to(sub.dtype))
            else:
                f = _h2d(freq, sub.dtype, dev)[:, None]
                q = _h2d(pres, sub.dtype, dev)[:, None]
                sub = sub - (f * counts + q * (counts > 0).to(sub.dtype))
        logits.index_copy_(0, row_idx, sub)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Sample one token per row (all rows here are non-greedy)."""
        dev = logits.device
        temps = [max(r.params.temperature, 1e-5) for r in reqs]
        if len(set(temps)) == 1:
            if temps[0] != 1.0:
                logits = logits / temps[0]
        else:
            logits = logits / _h2d(temps, torch.float32, dev)[:, None]
        top_k = [r.params.top_k for r in reqs]
        top_p = [r.params.top_p for r in reqs]
        min_p = [r.params.min_p for r in reqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if any(m > 0.0 for m in min_p):
            mp = _h2d(min_p, torch.float32, dev)[:, None]
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        # Exponential race (argmax p/q, q ~ Exp(1)) == sampling from p. A seeded row draws from its
        # own generator, so its output does not depend on its batch; unseeded rows share one
        # batched draw from the engine's generator.
        q = torch.empty_like(probs)
        seeded = [r for r, req in enumerate(reqs) if req.generator is not None]
        if not seeded:
            q.exponential_(generator=self.generator)
        else:
            unseeded = [r for r, req in enumerate(reqs) if req.generator is None]
            if unseeded:
                if unseeded == list(range(unseeded[0], unseeded[0] + len(unseeded))):
                    q[unseeded[0] : unseeded[0] + len(unseeded)].exponential_(generator=self.generator)
                else:
                    draw = torch.empty((len(unseeded), probs.shape[1]), dtype=probs.dtype, device=dev)
                    draw.exponential_(generator=self.generator)
                    q.index_copy_(0, _h2d(unseeded, torch.long, dev), draw)
            for r in seeded:
                q[r].exponential_(generator=reqs[r].generator)
        return (probs / q).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    # A top_k past the vocabulary keeps every token: clamped, so that any int fits the tensor.
    k = _h2d([min(k, vocab) if k > 0 else vocab for k in top_k], torch.long, logits.device)
    position = torch.arange(vocab, device=logits.device)[None, :]
    mask = position >= k[:, None]
    p = _h2d(top_p, torch.float32, logits.device)[:, None]
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    # drop tokens whose preceding cumulative mass already reaches top_p (always keep the first)
    mask |= (probs.cumsum(dim=-1) - probs) >= p
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
