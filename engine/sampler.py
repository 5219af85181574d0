"""Turns a step's logits into next tokens: penalties, min_tokens, temperature, top-k/top-p/min-p,
per-request seeded sampling, and top-k logprobs of the raw distribution (vLLM's default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    top_vals, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], token_ids[:, None][:, :0])
    rows = []
    for r in range(logprobs.shape[0]):
        row = [(int(token_ids[r]), float(chosen[r, 0]), int(ranks[r]))]
        row += [(int(t), float(v), i + 1) for i, (t, v) in enumerate(zip(top_ids[r].tolist(), top_vals[r].tolist()))]
        rows.append(row)
    return rows


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        # Unseeded requests draw from the engine's generator (seeded by LLM(seed=...)).
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        # logits: [M, V] fp32, row r belongs to reqs[r]
        num_rows = logits.shape[0]
        want_lp = [r.params.logprobs for r in reqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_lp) else None
        logits = self._apply_penalties(logits, reqs)

        greedy = torch.tensor([r.params.greedy for r in reqs], device=logits.device)
        token_ids = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            sampled = self._sample(logits, reqs)
            token_ids = torch.where(greedy, token_ids, sampled)

        logprobs: list[list[TokenLogprob] | None] = [None] * num_rows
        if raw_logprobs is not None:
            k = max(k for k in want_lp if k is not None)
            rows = topk_logprobs(raw_logprobs, token_ids, k)
            for r, kr in enumerate(want_lp):
                if kr is not None:
                    logprobs[r] = rows[r][: 1 + kr]
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        vocab = logits.shape[1]
        cloned = False
        for r, req in enumerate(reqs):
            p = req.params
            needs_min = req.num_output_tokens < p.min_tokens and p._all_stop_token_ids
            has_pen = p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
            if not (needs_min or has_pen):
                continue
            if not cloned:
                logits, cloned = logits.clone(), True
            row = logits[r]
            if has_pen:
                out_ids = torch.tensor(req.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(row.dtype)
                if p.repetition_penalty != 1.0:
                    seen = counts > 0
                    seen[torch.tensor(req.prompt_token_ids, dtype=torch.long, device=logits.device)] = True
                    penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                    row.copy_(torch.where(seen, penalised, row))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
            if needs_min:
                row[list(p._all_stop_token_ids)] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        dev = logits.device
        temp = torch.tensor([max(r.params.temperature, 1e-5) for r in reqs], device=dev)
        logits = logits / temp[:, None]
        top_k = [r.params.top_k for r in reqs]
        top_p = [r.params.top_p for r in reqs]
        min_p = [r.params.min_p for r in reqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if any(m > 0.0 for m in min_p):
            mp = torch.tensor(min_p, device=dev)[:, None]
            probs = probs.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, 0.0)
        # Exponential race (argmax p/q, q ~ Exp(1)) == sampling from p; each row draws from its own
        # generator when seeded, so a seeded request's output does not depend on its batch.
        q = torch.empty_like(probs)
        for r, req in enumerate(reqs):
            q[r].exponential_(generator=req.generator or self.generator)
        return (probs / q).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)
    position = torch.arange(vocab, device=logits.device)[None, :]
    mask = position >= k[:, None]
    p = torch.tensor(top_p, device=logits.device)[:, None]
    probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    # drop tokens whose preceding cumulative mass already reaches top_p (always keep the first)
    mask |= (probs.cumsum(dim=-1) - probs) >= p
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
