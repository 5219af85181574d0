"""vlmserve's attention kernels: paged attention and KV-cache writes behind one small interface.

This is vlmserve's own package (distribution ``vlmserve``), unrelated to the PyPI package named
``kernels`` that transformers probes for; ``__version__`` below is deliberately outside the
version range transformers accepts so that a probe can never mistake it for that package.
"""

from kernels.backend import AttentionBackend, AttentionMetadata
from kernels.registry import available_backends, get_backend, register_backend

__version__ = "0.0.0+vlmserve"

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "available_backends",
    "get_backend",
    "register_backend",
]
