"""Where the fused-kernel tests run (tests/test_fused_kernels.py, tests/test_fused_dispatch.py).

CUDA when there is a device (and TRITON_INTERPRET is not "1"); otherwise CPU through Triton's
interpreter. The interpreter must be on when triton itself (``tl.sum`` & co) and our kernels are
defined, and while they run (triton reads the variable lazily), so ``setup()`` switches it on for
the imports and the ``interpreter_env`` fixture for the tests, and it is off in between: other
test modules see the environment they were given.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

_WAS = os.environ.get("TRITON_INTERPRET")


def setup(*modules: str) -> str:
    """Imports triton, kernels.triton_fused and ``modules`` (other kernel modules) for this
    machine; returns the device to test on. Skips the calling module where triton is missing (or
    was imported in the other mode)."""
    if torch.cuda.is_available() and _WAS != "1":
        pytest.importorskip("triton")
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(importlib.import_module("triton.language").sum, InterpretedFunction):
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (set it in the environment)",
                        allow_module_level=True)
        importlib.import_module("kernels.triton_fused")
        for name in modules:
            importlib.import_module(name)
    finally:
        if _WAS is None:
            del os.environ["TRITON_INTERPRET"]
    return "cpu"


@pytest.fixture(scope="module", autouse=True)
def interpreter_env():
    """TRITON_INTERPRET=1 while a CPU module's tests run (autouse where imported)."""
    if _WAS is None and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            yield
        finally:
            os.environ.pop("TRITON_INTERPRET", None)
    else:
        yield


def compile_for_sm90(script: str) -> None:
    """Runs ``script`` (it compiles kernels for sm_90 through ptxas) in a fresh process without
    TRITON_INTERPRET: this one may have triton in interpreter mode. Skips where there is no
    ptxas; fails with the script's stderr otherwise."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas")
    assert proc.returncode == 0, proc.stderr[-4000:]
