"""Model runner: owns the model, the KV cache and the sampler; turns a SchedulerOutput into one
flattened (varlen) forward pass and the sampled tokens.

Requests stop here: what goes into the model is a ForwardBatch of tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.config import EngineConfig
from engine.device import to_device_async
from engine.encoder_cache import EncoderCache
from engine.loader import load_model
from engine.mm_device_preprocessor import get_device_preprocessor
from engine.multimodal import MultiModalFeature
from engine.request import Request
from engine.sampler import Sampler, TokenLogprob, topk_logprobs
from engine.scheduler import SchedulerOutput
from kernels import AttentionMetadata, get_backend

logger = logging.getLogger(__name__)


@dataclass
class ForwardBatch:
    # input_ids: [num_tokens] int64; positions: [num_tokens], or [3, num_tokens] for M-RoPE
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    # logits_indices: [num_sampled] int64 — rows of the hidden states that produce a next token
    logits_indices: torch.Tensor
    sample_reqs: list[Request]
    # (request, first row, number of rows) whose logits score the prompt (prompt_logprobs)
    prompt_rows: list[tuple[Request, int, int]] = field(default_factory=list)
    # (request id, feature, first encoder row, end encoder row, first batch row): encoder outputs
    # that replace the placeholder tokens' embeddings in this step
    mm_slices: list[tuple[str, MultiModalFeature, int, int, int]] = field(default_factory=list)
    # (request, first row, number of rows) of pooling requests: their hidden states are pooled
    pool_rows: list[tuple[Request, int, int]] = field(default_factory=list)


@dataclass
class StepHandle:
    """A launched step whose sampled tokens may still be on their way to the host."""

    batch: ForwardBatch
    # token_ids: [num_sampled] int64 on the device, row r sampled for batch.sample_reqs[r]
    token_ids: torch.Tensor | None
    logprobs: dict[str, list[TokenLogprob]]
    pooled: dict[str, torch.Tensor]
    # CUDA: a pinned host copy of token_ids in flight, and the event that marks it complete
    host_tokens: torch.Tensor | None = None
    event: object | None = None


@dataclass
class RunnerOutput:
    sampled: dict[str, int]
    logprobs: dict[str, list[TokenLogprob]]
    # Pooling requests whose prompt finished this step: the pooled vector, fp32 on CPU.
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.platform = config.platform
        self.device = config.platform.torch_device
        self.block_size = config.cache.block_size
        self.backend = get_backend(self.platform.type, config.attention_backend)
        torch.manual_seed(config.model.seed)
        self.model = load_model(config.model, self.platform, self.backend)
        # Feature data -> the vision tower's inputs on the device (e.g. Qwen2-VL packs uint8 pixels there).
        self.mm_preprocessor = get_device_preprocessor(config, self.device)
        self.sampler = Sampler(self.device, config.model.seed)
        self.uses_mrope = bool(getattr(self.model, "uses_mrope", False))
        self._init_input_buffers(config.scheduler.max_num_seqs, config.scheduler.max_model_len)
        # Room for a step's worth of image tokens several times over.
        self.encoder_cache = EncoderCache(capacity_rows=4 * config.scheduler.max_num_batched_tokens)
        self.num_blocks = self._determine_num_blocks()
        shape = self.backend.kv_cache_shape(self.num_blocks, self.block_size, self.model.num_kv_heads, self.model.head_dim)
        # kv_caches: num_layers x [2, num_blocks, block_size, Hkv, D] (reference layout); zeroed so that
        # masked-out slots never hold NaN garbage.
        self.kv_caches = [torch.zeros(shape, dtype=config.model.dtype, device=self.device) for _ in range(self.model.num_layers)]
        logger.info("KV cache: %d blocks of %d tokens (%s backend)", self.num_blocks, self.block_size, self.backend.name)
        self.cuda_graphs = None
        self.prefill_graphs = None
        if self.platform.type == "cuda" and not config.model.enforce_eager and not config.model.is_pooling:
            from engine.cuda_graphs import CudaGraphRunner

            self.cuda_graphs = CudaGraphRunner(
                self.model, self.kv_caches, max_num_seqs=config.scheduler.max_num_seqs,
                max_model_len=config.scheduler.max_model_len, block_size=self.block_size,
                uses_mrope=self.uses_mrope, device=self.device,
            )
            self.cuda_graphs.capture()
            from engine.cuda_graphs import PrefillGraphRunner

            # One sequence's prompt of up to 1024 tokens (the time-to-first-token path) replays
            # a graph too; bigger or batched prefills are compute-bound and run eagerly.
            self.prefill_graphs = PrefillGraphRunner(
                self.model, self.kv_caches, hidden_size=config.model.hidden_size, dtype=config.model.dtype,
                max_model_len=config.scheduler.max_model_len, block_size=self.block_size,
                uses_mrope=self.uses_mrope, device=self.device,
            )
            self.prefill_graphs.capture()
            if getattr(self.model, "vision_graphs_ok", False):
                from engine.cuda_graphs import EncoderGraphCache

                # Vision passes replay graphs too (one per grid list, or per run of same-size
                # images of a big pass), captured on first use: see EncoderGraphCache.
                self.model.visual_runner = EncoderGraphCache(self.model.visual)

    # -- KV cache sizing ------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.config.model.dtype).element_size()
        return 2 * self.block_size * self.model.num_kv_heads * self.model.head_dim * elem * self.model.num_layers

    def _determine_num_blocks(self) -> int:
        cache, sched = self.config.cache, self.config.scheduler
        if cache.num_blocks_override is not None:
            return cache.num_blocks_override
        # Never more than every sequence slot could fill at max_model_len (plus the null block).
        ceiling = sched.max_num_seqs * -(-sched.max_model_len // self.block_size) + 1
        if not self.platform.is_accelerator:
            return max(2, min(ceiling, cache.cpu_kv_cache_bytes // self._block_bytes()))
        free, total = self._profile_peak()
        budget = total * cache.gpu_memory_utilization - (total - free)
        blocks = int(budget // self._block_bytes())
        if blocks < 2:
            raise ValueError(
                f"gpu_memory_utilization: {cache.gpu_memory_utilization} leaves no room for the KV cache "
                f"({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after a profiling pass)"
            )
        return min(ceiling, blocks)

    @torch.inference_mode()
    def _profile_peak(self) -> tuple[float, int]:
        """Run one forward of max_num_batched_tokens to measure activation memory beside the weights."""
        sched = self.config.scheduler
        num_tokens = min(sched.max_num_batched_tokens, sched.max_num_seqs * sched.max_model_len)
        num_seqs = max(1, min(sched.max_num_seqs, num_tokens // max(1, sched.max_model_len // 4) or 1))
        per_seq = [num_tokens // num_seqs] * num_seqs
        per_seq[-1] += num_tokens - sum(per_seq)
        self.platform.synchronize()
        self.platform.reset_peak_memory_stats()
        shape = self.backend.kv_cache_shape(2, self.block_size, self.model.num_kv_heads, self.model.head_dim)
        scratch = [torch.zeros(shape, dtype=self.config.model.dtype, device=self.device) for _ in range(self.model.num_layers)]
        qsl = np.concatenate([[0], np.cumsum(per_seq)]).tolist()
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(num_tokens, dtype=torch.long, device=self.device),
            block_tables=torch.zeros((num_seqs, -(-max(per_seq) // self.block_size)), dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(per_seq, dtype=torch.int32, device=self.device),
            max_query_len=max(per_seq), max_seq_len=max(per_seq), block_size=self.block_size,
            query_start_loc_cpu=qsl, seq_lens_cpu=per_seq,
        )
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = ids.expand(3, -1).clone() if self.uses_mrope else ids.clone()
        hidden = self.model(ids, positions, scratch, meta)
        self.model.compute_logits(hidden[: sched.max_num_seqs])
        self.platform.synchronize()
        peak = self.platform.max_memory_allocated()
        del scratch, hidden
        self.platform.empty_cache()
        free, total = self.platform.mem_get_info()
        allocated_now = torch.cuda.memory_allocated() if self.platform.type == "cuda" else 0
        # Count the activation peak as used even though it has been released.
        return free - max(0, peak - allocated_now), total

    # -- one step -------------------------------------------------------------------------------
    def _init_input_buffers(self, max_num_seqs: int, max_model_len: int) -> None:
        """Persistent host buffers for decode-only steps (pinned on CUDA so that the copies to the
        device are asynchronous): a block table kept row by row across steps, and staging arrays
        for ids / positions / slots / seq_lens."""
        n = max(1, max_num_seqs)
        self._max_table_blocks = -(-max_model_len // self.block_size)
        pin = self.device.type == "cuda"

        def buf(shape, dtype):
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self._table = np.zeros((n, self._max_table_blocks), dtype=np.int32)
        # Two sets of staging buffers, used in turn: with async scheduling the copies of step n
        # may still be queued on the device while the host prepares step n + 1.
        self._stage_sets = [
            (buf(n * self._max_table_blocks, torch.int32),  # block table [n, width] packed
             buf(n, torch.int64),  # ids
             buf((3, n) if self.uses_mrope else n, torch.int64),  # positions
             buf(n, torch.int64),  # slots
             buf(n, torch.int32))  # seq_lens
            for _ in range(2)
        ]
        self._stage_flip = 0
        self._table_stage_t, self._ids_t, self._pos_t, self._slots_t, self._seqlens_t = self._stage_sets[0]
        # Two pinned landing buffers for sampled tokens: at most two steps are in flight.
        self._token_host = [buf(n, torch.int64) for _ in range(2)]
        self._token_flip = 0
        self._qsl_t = torch.arange(n + 1, dtype=torch.int32)
        self._logits_t = torch.arange(n, dtype=torch.int64)
        if pin:
            self._qsl_t = self._qsl_t.pin_memory()
            self._logits_t = self._logits_t.pin_memory()
        # Per table row: the block-id list it mirrors and how many of its entries are written.
        self._row_lists: list = [None] * n
        self._row_lens = [0] * n

    def _invalidate_rows(self) -> None:
        if getattr(self, "_row_lists", None) is not None:
            self._row_lists = [None] * len(self._row_lists)

    def _decode_only(self, out: SchedulerOutput, chained: bool) -> bool:
        """Every scheduled request computes exactly its one newest (generated) token and samples;
        ``chained``: every one of them takes that token from the in-flight step."""
        if getattr(self, "_row_lists", None) is None or len(out.scheduled) > len(self._row_lists):
            return False
        for req, n in out.scheduled:
            if n != 1 or req.num_computed_tokens + 1 != len(req.all_token_ids) or req.num_pending_tokens != chained \
                    or req.num_computed_tokens + req.num_pending_tokens < len(req.prompt_token_ids) \
                    or req.pooling_params is not None:
                return False
        return True

    def _prepare_decode(self, out: SchedulerOutput, prev: StepHandle | None = None) -> ForwardBatch:
        """prepare() for a decode-only step: one pass over per-request scalars, numpy arithmetic,
        a block table updated only in rows whose block list changed, one copy per tensor.

        ``prev``: the in-flight step whose sampled tokens (still on the device) are this step's
        inputs (async scheduling); each request's position is then one past its computed count."""
        bs = self.block_size
        sched = out.scheduled
        n = len(sched)
        reqs = [r for r, _ in sched]
        self._stage_flip ^= 1
        self._table_stage_t, self._ids_t, self._pos_t, self._slots_t, self._seqlens_t = \
            self._stage_sets[self._stage_flip]
        starts = np.fromiter((r.num_computed_tokens + r.num_pending_tokens for r in reqs), dtype=np.int64, count=n)
        if prev is None:
            ids = self._ids_t.numpy()[:n]
            ids[:] = np.fromiter((r.all_token_ids[-1] for r in reqs), dtype=np.int64, count=n)
        blk_idx = starts // bs
        cur = np.fromiter((r.block_ids[i] for r, i in zip(reqs, blk_idx.tolist())), dtype=np.int64, count=n)
        slots = self._slots_t.numpy()[:n]
        np.add(cur * bs, starts % bs, out=slots)
        seq = self._seqlens_t.numpy()[:n]
        seq[:] = starts + 1
        if self.uses_mrope:
            deltas = np.fromiter((r.mrope_delta for r in reqs), dtype=np.int64, count=n)
            pos = self._pos_t.numpy()[:, :n]
            pos[:] = (starts + deltas)[None, :]
        else:
            pos = self._pos_t.numpy()[:n]
            pos[:] = starts
        # Block table rows: rewrite a row whose request (block list) changed, else append new ids.
        table, row_lists, row_lens = self._table, self._row_lists, self._row_lens
        max_blocks = 0
        for i, r in enumerate(reqs):
            blocks = r.block_ids
            nb = len(blocks)
            max_blocks = max(max_blocks, nb)
            if row_lists[i] is blocks:
                done = row_lens[i]
                if done == nb:
                    continue
                if done < nb:
                    table[i, done:nb] = blocks[done:]
                    row_lens[i] = nb
                    continue
            old = row_lens[i]  # the row's written extent; past it the row is zero
            table[i, :nb] = blocks
            if old > nb:
                table[i, nb:old] = 0
            row_lists[i] = blocks
            row_lens[i] = nb
        dev = self.device
        non_blocking = dev.type == "cuda"
        table_t = self._table_stage_t[: n * max_blocks].view(n, max_blocks)
        table_t.numpy()[:] = table[:n, :max_blocks]
        seq_lens_cpu = seq.tolist()
        meta = AttentionMetadata(
            slot_mapping=self._slots_t[:n].to(dev, non_blocking=non_blocking),
            block_tables=table_t.to(dev, non_blocking=non_blocking),
            query_start_loc=self._qsl_t[: n + 1].to(dev, non_blocking=non_blocking),
            seq_lens=self._seqlens_t[:n].to(dev, non_blocking=non_blocking),
            max_query_len=1,
            max_seq_len=max(seq_lens_cpu),
            block_size=bs,
            query_start_loc_cpu=list(range(n + 1)),
            seq_lens_cpu=seq_lens_cpu,
        )
        positions = self._pos_t[:, :n] if self.uses_mrope else self._pos_t[:n]
        chained = None if prev is None else self._chained_ids(reqs, prev)
        if dev.type == "cuda":
            input_ids = chained if chained is not None else self._ids_t[:n].to(dev, non_blocking=True)
            positions = positions.to(dev, non_blocking=True)
            logits = self._logits_t[:n].to(dev, non_blocking=True)
        else:  # CPU: the staging buffers are reused next step, so hand out copies
            input_ids = chained if chained is not None else self._ids_t[:n].clone()
            positions = positions.clone()
            meta.slot_mapping = meta.slot_mapping.clone()
            meta.seq_lens = meta.seq_lens.clone()
            meta.query_start_loc = meta.query_start_loc.clone()
            meta.block_tables = meta.block_tables.clone()
            logits = self._logits_t[:n].clone()
        return ForwardBatch(input_ids=input_ids, positions=positions, attn=meta, logits_indices=logits,
                            sample_reqs=reqs)

    def _chained_ids(self, reqs: list[Request], prev: StepHandle) -> torch.Tensor:
        """input_ids [n] on the device: each request's token sampled by ``prev`` (no host trip)."""
        index = {r.request_id: i for i, r in enumerate(prev.batch.sample_reqs)}
        rows = [index[r.request_id] for r in reqs]
        if rows == list(range(len(rows))):
            return prev.token_ids[: len(rows)]
        idx = to_device_async(torch.tensor(rows, dtype=torch.long), prev.token_ids.device)
        return prev.token_ids.index_select(0, idx)

    def prepare(self, out: SchedulerOutput, prev: StepHandle | None = None) -> ForwardBatch:
        if self._decode_only(out, prev is not None):
            return self._prepare_decode(out, prev)
        self._invalidate_rows()
        return self._prepare_general(out, prev)

    # -- one step -------------------------------------------------------------------------------
    def _prepare_general(self, out: SchedulerOutput, prev: StepHandle | None = None) -> ForwardBatch:
        """Any mix of prompt chunks and decodes. ``prev``: the in-flight step this one follows
        (async scheduling): each request starts ``num_inflight_tokens`` past its computed count,
        and a request whose newest token ``prev`` samples takes that token from the device."""
        bs = self.block_size
        ids, pos, slots, qsl, seq_lens, tables = [], [], [], [0], [], []
        logits_rows, sample_reqs, prompt_rows, mm_slices, pool_rows = [], [], [], [], []
        chained_rows: list[int] = []  # batch rows whose input id is prev's sampled token
        chained_reqs: list[Request] = []
        for req, n in out.scheduled:
            start = req.num_computed_tokens + req.num_inflight_tokens
            p = np.arange(start, start + n)
            blocks = np.asarray(req.block_ids, dtype=np.int64)
            known = req.all_token_ids[start : start + n]
            if len(known) < n:  # the last input is the token prev samples: filled in on the device
                assert prev is not None and len(known) == n - 1 and req.num_pending_tokens == 1
                chained_rows.append(qsl[-1] + n - 1)
                chained_reqs.append(req)
                known = known + [0]
            ids.append(np.asarray(known, dtype=np.int64))
            pos.append(self._mrope_positions(req, p) if self.uses_mrope else p)
            slots.append(blocks[p // bs] * bs + p % bs)
            row0 = qsl[-1]
            for f in req.mm_features:
                lo, hi = max(start, f.offset), min(start + n, f.end)
                if lo < hi:  # this chunk covers some of the item's placeholder tokens
                    mm_slices.append((req.request_id, f, lo - f.offset, hi - f.offset, row0 + lo - start))
            qsl.append(row0 + n)
            seq_lens.append(start + n)
            tables.append(req.block_ids)
            if req.wants_prompt_logprobs and start < req.num_prompt_tokens - 1:
                prompt_rows.append((req, row0, min(n, req.num_prompt_tokens - 1 - start)))
            if req.is_pooling:
                pool_rows.append((req, row0, n))
            elif start + n == req.num_tokens + req.num_pending_tokens:
                logits_rows.append(row0 + n - 1)
                sample_reqs.append(req)
        max_blocks = max(len(t) for t in tables)
        table = np.zeros((len(tables), max_blocks), dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=to_device_async(torch.from_numpy(np.concatenate(slots)), dev),
            block_tables=to_device_async(torch.from_numpy(table), dev),
            query_start_loc=to_device_async(torch.tensor(qsl, dtype=torch.int32), dev),
            seq_lens=to_device_async(torch.tensor(seq_lens, dtype=torch.int32), dev),
            max_query_len=max(n for _, n in out.scheduled),
            max_seq_len=max(seq_lens),
            block_size=bs,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        input_ids = to_device_async(torch.from_numpy(np.concatenate(ids)), dev)
        if chained_reqs:
            rows = to_device_async(torch.tensor(chained_rows, dtype=torch.long), dev)
            input_ids.index_copy_(0, rows, self._chained_ids(chained_reqs, prev))
        return ForwardBatch(
            input_ids=input_ids,
            positions=to_device_async(torch.from_numpy(np.concatenate(pos, axis=-1)), dev),
            attn=meta,
            logits_indices=to_device_async(torch.tensor(logits_rows, dtype=torch.long), dev),
            sample_reqs=sample_reqs,
            prompt_rows=prompt_rows,
            mm_slices=mm_slices,
            pool_rows=pool_rows,
        )

    @staticmethod
    def _mrope_positions(req: Request, p: np.ndarray) -> np.ndarray:
        """[3, n] M-RoPE positions: the processor's for prompt tokens, p + delta for later ones."""
        out = np.repeat((p + req.mrope_delta)[None, :], 3, axis=0)
        if req.mrope_positions is not None:
            prompt = np.asarray(req.mrope_positions)
            in_prompt = p < prompt.shape[1]
            out[:, in_prompt] = prompt[:, p[in_prompt]]
        return out

    def _merge_multimodal(self, batch: ForwardBatch) -> torch.Tensor:
        """Token embeddings with each covered item's encoder rows written over its placeholders.

        Items not in the encoder cache are encoded once, all of a modality in one vision-tower pass
        when the model can batch them (launch overhead dominates per-image passes on a GPU)."""
        embeds = self.model.get_input_embeddings(batch.input_ids)  # [N, hidden]
        fresh = self._encode_missing(batch)
        for request_id, f, lo, hi, row in batch.mm_slices:
            enc = self.encoder_cache.get(f.identifier, request_id)
            if enc is None:  # first chunk touching this item
                enc = fresh[f.identifier]
                if enc.shape[0] != f.length:
                    raise ValueError(
                        f"multi_modal_data: {f.modality} item yields {enc.shape[0]} embeddings "
                        f"but the prompt has {f.length} placeholder tokens for it"
                    )
                self.encoder_cache.put(f.identifier, request_id, enc)
            embeds[row : row + hi - lo] = enc[lo:hi].to(embeds.dtype)
        return embeds

    def _encode_missing(self, batch: ForwardBatch) -> dict[str, torch.Tensor]:
        """identifier -> encoder output [rows, hidden] for this step's items not yet cached."""
        todo: dict[str, dict[str, MultiModalFeature]] = {}  # modality -> identifier -> feature
        for _, f, _, _, _ in batch.mm_slices:
            if f.identifier not in self.encoder_cache.entries:
                todo.setdefault(f.modality, {}).setdefault(f.identifier, f)
        fresh: dict[str, torch.Tensor] = {}
        batched = getattr(self.model, "embed_multimodal_batch", None)
        for modality, feats in todo.items():
            items = list(feats.values())
            inputs = self.mm_preprocessor.prepare(modality, [f.data for f in items])
            if batched is not None and len(items) > 1:
                outs = batched(modality, inputs)
            else:
                outs = [self.model.embed_multimodal(modality, d) for d in inputs]
            fresh.update((f.identifier, e) for f, e in zip(items, outs))
        return fresh

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step and return its sampled tokens (launch + collect)."""
        return self.collect(self.launch(out))

    def collect(self, handle: StepHandle) -> RunnerOutput:
        """Wait for a launched step's sampled tokens and hand them to the host."""
        reqs = handle.batch.sample_reqs
        if handle.token_ids is None:
            return RunnerOutput(sampled={}, logprobs={}, pooled=handle.pooled)
        if handle.event is not None:
            handle.event.synchronize()  # only this step: a chained successor may already be running
            tokens = handle.host_tokens.tolist()
        else:
            tokens = handle.token_ids.tolist()
        sampled = {r.request_id: t for r, t in zip(reqs, tokens)}
        return RunnerOutput(sampled=sampled, logprobs=handle.logprobs, pooled=handle.pooled)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: StepHandle | None = None) -> StepHandle:
        """Prepare and enqueue one step on the device, sampling included, without waiting for it.
        ``prev``: the in-flight step this one continues (its sampled tokens are the inputs)."""
        batch = self.prepare(out, prev)
        num_tokens = batch.positions.shape[-1]
        # embeds: [N, hidden] with image rows merged, or None (the model embeds the ids itself)
        embeds = self._merge_multimodal(batch) if batch.mm_slices else None
        if embeds is None and self.cuda_graphs is not None and self.cuda_graphs.can_run(batch.attn.num_seqs, batch.attn):
            hidden = self.cuda_graphs.run(batch.input_ids, batch.positions, batch.attn)  # [N, hidden]
        elif self.prefill_graphs is not None and self.prefill_graphs.can_run(num_tokens, batch.attn):
            if embeds is None:
                embeds = self.model.get_input_embeddings(batch.input_ids)
            hidden = self.prefill_graphs.run(embeds, batch.positions, batch.attn)
        else:
            ids = batch.input_ids if embeds is None else None
            hidden = self.model(ids, batch.positions, self.kv_caches, batch.attn, inputs_embeds=embeds)  # [N, hidden]
        for req, row0, rows in batch.prompt_rows:
            self._score_prompt(req, hidden[row0 : row0 + rows], req.num_computed_tokens)
        pooled = self._pool(batch.pool_rows, hidden) if batch.pool_rows else {}
        if not batch.sample_reqs:
            return StepHandle(batch, None, {}, pooled)
        # logits: [M, vocab] in the model's dtype (the sampler upcasts what it computes with)
        logits = self.model.compute_logits(hidden[batch.logits_indices], upcast=False)
        token_ids, lps = self.sampler.sample(logits, batch.sample_reqs)  # token_ids: [M] int64
        logprobs = {r.request_id: lp for r, lp in zip(batch.sample_reqs, lps) if lp is not None}
        handle = StepHandle(batch, token_ids, logprobs, pooled)
        if token_ids.is_cuda:
            # Land the tokens in a pinned buffer behind an event: collect() then waits for this
            # step alone, not for a successor enqueued after it on the same stream.
            host = self._token_host[self._token_flip][: token_ids.shape[0]]
            self._token_flip ^= 1
            host.copy_(token_ids, non_blocking=True)
            handle.host_tokens, handle.event = host, torch.cuda.Event()
            handle.event.record()
        return handle

    def _pool(self, pool_rows: list[tuple[Request, int, int]], hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pool the hidden states (after the final norm) of pooling requests' prompt chunks; a
        request whose prompt ends in this chunk gets its vector (truncated to ``dimensions``,
        then L2-normalised if asked), fp32 on CPU. MEAN sums across chunks in ``req.pool_acc``."""
        done_reqs, vectors = [], []
        for req, row0, n in pool_rows:
            start = req.num_computed_tokens  # not yet advanced for this step
            rows = hidden[row0 : row0 + n]
            if start == 0:
                req.pool_acc = None
            if req.pooling_type == "MEAN":
                part = rows.float().sum(dim=0)
                req.pool_acc = part if req.pool_acc is None else req.pool_acc + part
            elif req.pooling_type == "CLS" and start == 0:
                req.pool_acc = rows[0].float()
            if start + n < req.num_prompt_tokens:
                continue
            if req.pooling_type == "MEAN":
                vec = req.pool_acc / req.num_prompt_tokens
            elif req.pooling_type == "CLS":
                vec = req.pool_acc
            else:  # LAST
                vec = rows[-1].float()
            req.pool_acc = None
            done_reqs.append(req)
            vectors.append(vec)
        if not done_reqs:
            return {}
        out: dict[str, torch.Tensor] = {}
        for req, vec in zip(done_reqs, vectors):
            params = req.pooling_params
            if params.dimensions is not None:
                vec = vec[: params.dimensions]
            if params.normalize:
                vec = torch.nn.functional.normalize(vec, p=2, dim=-1)
            out[req.request_id] = vec.to("cpu", torch.float32)
        return out

    def _score_prompt(self, req: Request, hidden: torch.Tensor, start: int) -> None:
        """Logprobs of prompt tokens start+1 .. start+rows given their prefixes (skipping ones already
        scored before a preemption)."""
        done = len(req.prompt_logprobs_acc)  # positions 0..done-1 already have entries
        if start == 0 and done == 0:
            req.prompt_logprobs_acc.append(None)
            done = 1
        skip = max(0, done - 1 - start)
        if skip >= hidden.shape[0]:
            return
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[skip:]), dim=-1)
        targets = torch.tensor(
            req.prompt_token_ids[start + 1 + skip : start + 1 + hidden.shape[0]], dtype=torch.long, device=logprobs.device
        )
        req.prompt_logprobs_acc.extend(topk_logprobs(logprobs, targets, req.params.prompt_logprobs))
