"""Probe (GPU): does EncoderGraphCache capture again after its graphs are dropped while its pool
handle is kept (the old way to reset it), and after clear()? Prints which keys fell back to eager.

    PYTHONPATH=. python3 bench/graph_pool_probe.py
"""

from __future__ import annotations

import torch

from bench.vision_pass_bench import build_tower
from engine.cuda_graphs import EncoderGraphCache


def main() -> None:
    import bench.gpu_throughput as g

    g.VISION_2B.update(depth=4)
    tower = build_tower(torch.device("cuda"), torch.bfloat16)
    px = lambda n: torch.randn(n * 1024, 1176, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    with torch.inference_mode():
        for how in ("graphs.clear() only", "clear()"):
            cache = EncoderGraphCache(tower)
            for n in (1, 2, 3):
                cache(px(n), [[1, 32, 32]] * n)
            cache.graphs.clear() if how.startswith("graphs") else cache.clear()
            cache(px(1), [[1, 32, 32]])
            print(how, "-> after it, the 1-image key captured:", all(e is not None for e in cache.graphs.values()))


if __name__ == "__main__":
    main()
