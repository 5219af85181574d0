"""Parameters of a pooling (embedding) request, shaped like vLLM's ``PoolingParams``."""

from __future__ import annotations

from dataclasses import dataclass

POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass(frozen=True)
class PoolingParams:
    """``normalize``: L2-normalise the pooled vector (after any truncation).
    ``dimensions``: keep only the first ``dimensions`` values (matryoshka truncation)."""

    normalize: bool = True
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize: must be a boolean, got {self.normalize!r}")
        if self.dimensions is not None and (
            isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int) or self.dimensions <= 0
        ):
            raise ValueError(f"dimensions: must be a positive integer, got {self.dimensions!r}")
