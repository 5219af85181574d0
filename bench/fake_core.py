"""A stand-in engine core that makes tokens without a model, for measuring the API process alone.

On this 2-core CPU machine the tiny model's core makes ~300-450 tokens/s, so the API process
idles most of the time and its per-token cost is measured cold, between slow steps. On the GPU
the core makes 20k tokens/s and the API process is the bottleneck. This core gives the API
process that regime on a CPU: every ``FAKE_CORE_STEP_S`` (default 5 ms) each running request gets
one token, and a request ends with ``finish_reason="length"`` at its ``max_tokens``. The tokens
cycle through ordinary vocabulary ids, so detokenisation does real work.

``python -m bench.fake_core ADDRESS`` is what ``bench/stream_cost.py``'s server launches instead
of ``python -m engine.core_process``; the protocol, threads and pipe are the real core process's
(``engine.core_process.run_engine_core`` with this class in place of ``EngineCore``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from multiprocessing.connection import Client
from typing import Any

from engine.engine_core import EngineCoreOutput, EngineStats

# Ids of ordinary text tokens in the tiny Qwen2 tokenizer (byte-level BPE): words and spaces,
# with a few multi-byte characters so that the incremental detokeniser holds some pieces back.
TOKEN_CYCLE = list(range(300, 1300, 7))


class _Blocks:
    num_usable_blocks = 1 << 20

    def usage(self) -> float:
        return 0.0


class FakeCore:
    """EngineCore's interface as ``engine.core_process`` uses it; no model, no KV cache."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.block_manager = _Blocks()
        self.step_s = float(os.environ.get("FAKE_CORE_STEP_S", "0.005"))
        self._running: dict[str, list[int]] = {}  # request id -> [tokens made, max_tokens]
        self._aborted: list[EngineCoreOutput] = []
        self._new: set[str] = set()
        self._last_step = 0.0

    def add_request(self, req: Any) -> None:
        if not req.prompt_token_ids:
            raise ValueError("prompt: must contain at least one token")
        if req.sampling_params is None:
            raise ValueError("pooling_params: the fake core only generates")
        self._running[req.request_id] = [0, req.sampling_params.max_tokens or 16]
        self._new.add(req.request_id)

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self._running.pop(rid, None) is not None:
                self._aborted.append(EngineCoreOutput(rid, [], finish_reason="abort"))

    def has_unfinished(self) -> bool:
        return bool(self._running) or bool(self._aborted)

    def step(self, idle: Any = None) -> list[EngineCoreOutput]:
        # A fixed step period, as a GPU's decode step: the front end gets one token per request
        # per period, however fast it could take them.
        wait = self._last_step + self.step_s - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        self._last_step = time.perf_counter()
        outputs, self._aborted = self._aborted, []
        now = time.time()
        for rid, state in list(self._running.items()):
            token = TOKEN_CYCLE[state[0] % len(TOKEN_CYCLE)]
            state[0] += 1
            done = state[0] >= state[1]
            outputs.append(EngineCoreOutput(rid, [token], finish_reason="length" if done else None,
                                            scheduled_time=now if rid in self._new else None))
            self._new.discard(rid)
            if done:
                del self._running[rid]
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self._running), num_blocks=self.block_manager.num_usable_blocks,
                           step_time=self.step_s)


def _main() -> None:
    import engine.core_process as core_process
    import engine.engine_core as engine_core

    logging.basicConfig(level=os.environ.get("VLMSERVE_LOG_LEVEL", "INFO"))
    engine_core.EngineCore = FakeCore  # run_engine_core imports it from here when it starts
    authkey = bytes.fromhex(os.environ.pop("VLMSERVE_CORE_AUTHKEY"))
    conn = Client(sys.argv[1], family="AF_UNIX", authkey=authkey)
    core_process.run_engine_core(core_process.recv_msg(conn), conn, authkey)


if __name__ == "__main__":
    _main()
