"""Start-up vision warm-up (engine.warmup): every pass of 1..k images of a warm-up size is run
once before the engine serves, and nothing of it stays behind.

On the CPU there are no vision graphs, so ``EngineCore`` skips the warm-up by itself; here a
recording wrapper stands in for the graph cache (``model.visual_runner``), which is what the
warm-up exists to fill, and ``warm_up_vision`` is called on a CPU engine core.
"""

from __future__ import annotations

import pytest
import tiny_vlm

from engine.config import EngineArgs
from engine.engine_core import EngineCore
from engine.warmup import warm_up_vision


class RecordingTower:
    """Calls the real tower and records the grid list of every pass."""

    def __init__(self, tower) -> None:
        self.tower = tower
        self.passes: list[list[tuple[int, ...]]] = []

    def __call__(self, pixels, grid):
        self.passes.append([tuple(int(v) for v in g) for g in grid])
        return self.tower(pixels, grid)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_vl_warmup"), seed=0)


def make_core(vlm_dir, sizes, max_num_batched_tokens: int) -> EngineCore:
    args = EngineArgs(model=str(vlm_dir), dtype="float32", device="cpu", max_model_len=512, max_num_seqs=16,
                      max_num_batched_tokens=max_num_batched_tokens, warmup_image_sizes=sizes)
    return EngineCore(args.create_engine_config())


def test_cpu_core_skips_warm_up_without_vision_graphs(vlm_dir, monkeypatch):
    calls = []
    monkeypatch.setattr("engine.processor.InputProcessor.process", lambda *a, **k: calls.append(a))
    core = make_core(vlm_dir, ((112, 112),), 512)
    assert core.runner.model.visual_runner is None and not calls


def test_warm_up_runs_every_pass_size_and_leaves_no_trace(vlm_dir):
    core = make_core(vlm_dir, (), 128)
    tower = RecordingTower(core.runner.model.visual)
    core.runner.model.visual_runner = tower
    core.config = type(core.config)(**{**core.config.__dict__, "model": type(core.config.model)(
        **{**core.config.model.__dict__, "warmup_image_sizes": ((112, 112), (84, 112))})})
    launch, batch_sizes = core.runner.launch, []

    def recording_launch(out, *args, **kwargs):
        batch_sizes.append(len(out.scheduled))
        return launch(out, *args, **kwargs)

    core.runner.launch = recording_launch
    warm_up_vision(core)

    # A 112x112 image is a [1, 8, 8] grid (16 LM tokens + 2 around it): 128 // 18 = 7 a step;
    # an 84x112 one [1, 6, 8] (12 + 2): 9 a step.
    big, small = (1, 8, 8), (1, 6, 8)
    counts_big = sorted(len(p) for p in tower.passes if set(p) == {big})
    counts_small = sorted(len(p) for p in tower.passes if set(p) == {small})
    assert len(tower.passes) == len(counts_big) + len(counts_small)  # one size per pass
    # The sweep: one pass of each count from 1 to a step's worth; then the burst of max_num_seqs
    # (16) requests with text, whose prefills are cut across steps.
    assert set(range(1, 8)) <= set(counts_big), counts_big
    assert set(range(1, 10)) <= set(counts_small), counts_small
    assert sum(counts_big) == sum(range(1, 8)) + 16 and sum(counts_small) == sum(range(1, 10)) + 16
    assert max(batch_sizes) == 16  # the burst's steps run all max_num_seqs requests at once
    # Nothing is left: no request, no cached prefix block, no prefix-cache statistics.
    assert not core.has_unfinished()
    bm = core.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    assert bm.num_queried_tokens == bm.num_hit_tokens == 0
