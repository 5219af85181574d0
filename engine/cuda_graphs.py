"""CUDA graphs for decode-only steps.

A decode step of a small model is launch-bound: hundreds of small kernels whose launch costs far
more host time than they take on the GPU. ``CudaGraphRunner`` captures the language model's forward
(embeddings -> layers -> final norm; logits and sampling stay eager, on the real rows only) once per
padded batch size of a ladder and replays the graph whose size is the smallest one that holds the
step's sequences.

Static state, shared by every captured size (a size ``bs`` uses the first ``bs`` rows):
  * input_ids [max_bs], positions [max_bs] (or [3, max_bs] for M-RoPE), slot_mapping [max_bs],
    seq_lens [max_bs], query_start_loc [max_bs + 1] (= arange: every query has one token),
    block_tables [max_bs, max_blocks_per_seq];
  * one output hidden-state tensor per size (memory of the shared graph pool).

Padded rows write their key/value to slot 0 (block 0 is the null block) and attend over one key
(seq_len 1) read through their block-table row, so they never write a real block. The attention
metadata seen at capture time has ``max_seq_len = max_model_len``: the Triton decode kernel sizes
its grid (number of context splits) from that host value, so one graph serves every context
length; splits past a sequence's length are empty and the reduce kernel weighs them out.
"""

from __future__ import annotations

import logging
import time

import torch

from kernels import AttentionMetadata

logger = logging.getLogger(__name__)

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def capture_sizes(max_num_seqs: int, ladder: tuple[int, ...] = DEFAULT_CAPTURE_SIZES) -> list[int]:
    """The ladder capped by max_num_seqs; max_num_seqs itself is added when it falls between rungs
    (so that every decode batch the scheduler can form has a graph). Past the ladder's top (512,
    vLLM's default too) decode steps run eagerly."""
    sizes = [s for s in ladder if s <= max_num_seqs]
    if max_num_seqs <= ladder[-1] and (not sizes or sizes[-1] < max_num_seqs):
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], *, max_num_seqs: int,
                 max_model_len: int, block_size: int, uses_mrope: bool, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.uses_mrope = uses_mrope
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1] if self.sizes else 0
        self.max_blocks = -(-max_model_len // block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        n = self.max_bs
        with torch.inference_mode():
            self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
            self.positions = torch.zeros((3, n) if uses_mrope else (n,), dtype=torch.long, device=device)
            self.slot_mapping = torch.zeros(n, dtype=torch.long, device=device)
            self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
            self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)

    @property
    def max_captured(self) -> int:
        return self.max_bs if self.graphs else 0

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # fixed grid: one graph for every context length
            block_size=self.block_size,
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[1] * bs,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        positions = self.positions[:, :bs] if self.uses_mrope else self.positions[:bs]
        return self.model(self.input_ids[:bs], positions, self.kv_caches, self._meta(bs))

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every size, largest first, in one shared memory pool. Call after
        the KV cache is allocated (the graphs bake in its address)."""
        if not self.sizes:
            return
        t0 = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        # Everything reads block 0 / writes slot 0 during warm-up and capture.
        self.slot_mapping.zero_()
        self.seq_lens.fill_(1)
        self.block_tables.zero_()
        for bs in reversed(self.sizes):
            self._forward(bs)  # warm-up: Triton JIT, cuBLAS handles, split-decision caches
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(bs)
            self.graphs[bs] = graph
            self.outputs[bs] = out
        torch.cuda.synchronize(self.device)
        logger.info("CUDA graphs: captured %d decode batch sizes (up to %d) in %.1f s",
                    len(self.sizes), self.max_bs, time.perf_counter() - t0)

    def can_run(self, num_seqs: int, meta: AttentionMetadata) -> bool:
        return bool(self.graphs) and meta.max_query_len == 1 and 0 < num_seqs <= self.max_bs \
            and meta.block_tables.shape[1] <= self.max_blocks

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_seqs, hidden] of a decode-only step (one token per sequence); a view
        of the graph's static output, valid until the next replay."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        if self.uses_mrope:
            self.positions[:, :n].copy_(positions, non_blocking=True)
        else:
            self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if bs > n:
            # padded rows: write the null slot, attend over one key; their block-table rows only
            # ever hold valid block ids (zeros or a past step's), of which column 0 is read.
            self.slot_mapping[n:bs].zero_()
            self.seq_lens[n:bs].fill_(1)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]


class EncoderGraphCache:
    """CUDA graphs of a vision tower, keyed by the grids of the items they encode.

    A vision pass through a 32-layer ViT launches hundreds of kernels at ~10-40 us of host time
    each. For one image that time is the time-to-first-token; in a batched prefill step the
    device is busy, but the host's launches then compete with everything else it must do before
    the device runs dry (the next step's inputs, the front end). So every pass replays graphs:

      * a pass of at most ``max_patches`` patches replays one graph keyed by its whole grid list;
      * a bigger pass is cut into chunks of consecutive items of one grid, each of at most
        ``chunk_patches`` patches (e.g. 16 images of 448x448), each replaying the graph of its
        (grid, count) and copied out. The tower must encode items independently (Qwen2-VL's does:
        attention stays within a frame, everything else is per patch), so chunking leaves each
        item's output as a pass over all of them computes it, up to GEMM summation order.

    Each distinct key is captured the first time it is seen, up to ``max_graphs`` of them (then
    it runs eagerly), in one memory pool: replays never overlap and each output is copied out
    before the next replay. An item bigger than ``chunk_patches`` runs eagerly.

    ``tower(pixel_values [P, K], grid: list[[t, h, w]]) -> [P / m^2, hidden]`` must not sync
    with the host; a tower that fails to capture is run eagerly for that key from then on.
    """

    def __init__(self, tower: torch.nn.Module, *, max_patches: int = 4096, chunk_patches: int = 16384,
                 max_graphs: int = 24) -> None:
        self.tower = tower
        self.max_patches = max_patches
        self.chunk_patches = chunk_patches
        self.max_graphs = max_graphs
        self.pool = None
        # grid key -> (static input, graph, static output), or None when capture failed
        self.graphs: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor] | None] = {}

    def clear(self) -> None:
        """Drop every captured graph and their memory pool (e.g. after the tower's kernels were
        switched). The pool goes too, so that new captures start a fresh one: after a benchmark
        A/B that dropped the graphs only, the captures that followed failed (those keys ran
        eagerly: batch-1 TTFT 35 ms on an H200); with clear() the same sequence measured 11.8 ms
        (gpu_throughput_h200_vit_ab.json, then _ab2.json)."""
        self.graphs.clear()
        self.pool = None

    def __call__(self, pixel_values: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
        if not pixel_values.is_cuda:
            return self.tower(pixel_values, grid)
        if pixel_values.shape[0] > self.max_patches:  # chunk_patches=0: big passes run eagerly
            return self._chunked(pixel_values, grid) if self.chunk_patches else self.tower(pixel_values, grid)
        return self._replay(pixel_values, grid)

    def _replay(self, pixel_values: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
        key = tuple(tuple(int(v) for v in g) for g in grid)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.tower(pixel_values, grid)
            self.graphs[key] = self._capture(pixel_values, [list(g) for g in key])
        entry = self.graphs[key]
        if entry is None:
            return self.tower(pixel_values, grid)
        static_in, graph, static_out = entry
        static_in.copy_(pixel_values)
        graph.replay()
        return static_out.clone()

    def _chunked(self, pixel_values: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
        # pixel_values: [P, K], the items' patch rows back to back -> [P / m^2, hidden]
        outs: list[torch.Tensor] = []
        row = i = 0
        while i < len(grid):
            g = [int(v) for v in grid[i]]
            n = g[0] * g[1] * g[2]  # patches of this item
            j = i + 1
            while j < len(grid) and [int(v) for v in grid[j]] == g and (j - i + 1) * n <= self.chunk_patches:
                j += 1
            rows = pixel_values[row : row + (j - i) * n]
            outs.append(self.tower(rows, [g]) if n > self.chunk_patches else self._replay(rows, [g] * (j - i)))
            row += (j - i) * n
            i = j
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @torch.inference_mode()
    def _capture(self, example: torch.Tensor, grid: list[list[int]]):
        static_in = example.clone()
        try:
            # warm-up on a side stream (cuDNN / flash heuristics, Triton JIT), then capture
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.tower(static_in, grid)
            torch.cuda.current_stream().wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.tower(static_in, grid)
        except RuntimeError as exc:  # e.g. a host sync inside the tower: run it eagerly instead
            logger.warning("vision tower: CUDA graph capture failed for grid %s (%s); running eagerly", grid, exc)
            return None
        return static_in, graph, static_out


DEFAULT_PREFILL_SIZES = (128, 256, 512, 1024)


class PrefillGraphRunner:
    """CUDA graphs of the language model's forward for one sequence's prompt of up to
    ``max(sizes)`` tokens: the time-to-first-token path, launch-bound at such lengths.

    The graph of the smallest size ``Np >= n`` runs a prompt chunk of ``n`` tokens from input
    embeddings (the runner's, with image rows merged). The padded rows ``n..Np-1`` form a second
    sequence whose block-table row is all null block: zero embeddings, position 0, keys/values
    written to the null slot 0 and read back from the null block, so they stay finite and never
    touch the real sequence. The kernel's grid is sized for ``Np``; the real split, [0, n, Np], is
    read on the device.
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], *, hidden_size: int,
                 dtype: torch.dtype, max_model_len: int, block_size: int, uses_mrope: bool,
                 device: torch.device, sizes: tuple[int, ...] = DEFAULT_PREFILL_SIZES) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.uses_mrope = uses_mrope
        self.sizes = [s for s in sizes if s <= max_model_len]
        self.max_n = self.sizes[-1] if self.sizes else 0
        self.max_blocks = -(-max_model_len // block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        n = self.max_n
        with torch.inference_mode():
            self.embeds = torch.zeros((n, hidden_size), dtype=dtype, device=device)
            self.positions = torch.zeros((3, n) if uses_mrope else (n,), dtype=torch.long, device=device)
            self.slot_mapping = torch.zeros(n, dtype=torch.long, device=device)
            # row 0: the real sequence; row 1: the padding, always the null block
            self.block_tables = torch.zeros((2, self.max_blocks), dtype=torch.int32, device=device)
            self.query_start_loc = torch.tensor([0, 1, 1], dtype=torch.int32, device=device)
            self.seq_lens = torch.ones(2, dtype=torch.int32, device=device)
            # host staging for [0, n, Np] and [seq_len, Np - n] (one copy each per replay)
            pin = device.type == "cuda"
            self._qsl_host = torch.zeros(3, dtype=torch.int32, pin_memory=pin)
            self._seq_host = torch.zeros(2, dtype=torch.int32, pin_memory=pin)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables,
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens,
            max_query_len=size,  # sizes the kernel grid; the real length is read on the device
            max_seq_len=self.max_model_len, block_size=self.block_size,
            query_start_loc_cpu=[0, size, size], seq_lens_cpu=[size, 1],
        )

    def _forward(self, size: int) -> torch.Tensor:
        positions = self.positions[:, :size] if self.uses_mrope else self.positions[:size]
        return self.model(None, positions, self.kv_caches, self._meta(size), inputs_embeds=self.embeds[:size])

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every size (largest first) in one pool; after the KV cache exists."""
        if not self.sizes:
            return
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.slot_mapping.zero_()
        self.block_tables.zero_()
        for size in reversed(self.sizes):
            self.query_start_loc.copy_(torch.tensor([0, size, size], dtype=torch.int32))
            self.seq_lens.copy_(torch.tensor([size, 1], dtype=torch.int32))
            self._forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(size)
            self.graphs[size] = graph
            self.outputs[size] = out
        torch.cuda.synchronize()
        logger.info("CUDA graphs: captured %d prefill sizes (up to %d tokens) in %.1f s",
                    len(self.sizes), self.max_n, time.perf_counter() - t0)

    def can_run(self, num_tokens: int, meta: AttentionMetadata) -> bool:
        return bool(self.graphs) and meta.num_seqs == 1 and 1 < num_tokens <= self.max_n \
            and meta.block_tables.shape[1] <= self.max_blocks

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [n, hidden] of one sequence's chunk (a view valid until the next replay).
        embeds: [n, hidden]; positions: [n] or [3, n]."""
        n = embeds.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.embeds[:n].copy_(embeds, non_blocking=True)
        self.embeds[n:size].zero_()
        if self.uses_mrope:
            self.positions[:, :n].copy_(positions, non_blocking=True)
            self.positions[:, n:size].zero_()
        else:
            self.positions[:n].copy_(positions, non_blocking=True)
            self.positions[n:size].zero_()
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:size].zero_()
        width = meta.block_tables.shape[1]
        self.block_tables[:1, :width].copy_(meta.block_tables, non_blocking=True)
        qsl, seq = self._qsl_host.numpy(), self._seq_host.numpy()
        qsl[:] = (0, n, size)
        seq[:] = (meta.seq_lens_cpu[0], max(1, size - n))
        self.query_start_loc.copy_(self._qsl_host, non_blocking=True)
        self.seq_lens.copy_(self._seq_host, non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:n]
