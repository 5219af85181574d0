"""One ``/metrics`` for all API server processes (``--api-server-count N``), as vLLM does it.

With N > 1 the kernel hands each scrape to any of the N processes. If each answered only its own
counters, Prometheus would see ``vllm:request_success_total`` jump between N unrelated values
(each drop read as a counter reset), and every rate, dashboard and autoscaler on it would be
wrong. prometheus-client's multiprocess mode keeps every process's counters and histograms in
memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR``, and any process can sum them all at
scrape time.

The directory must be set before ``prometheus_client`` is first imported (it picks its value
class at import), so ``prepare`` reads the command line before kserve (which imports it) is
imported: ``runtime._kserve`` calls it. The head creates the directory and removes it at exit;
the copies it starts inherit the variable. A directory the user set is used and left alone.

Gauges that are the engine's (requests running, KV-cache usage) come from each process's latest
copy of the engine core's statistics and are the same everywhere; they stay outside the files.
The per-process collectors of the default registry (``process_*``, ``python_*``) are not served
in this mode (their values would be one random process's).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Sequence

ENV = "PROMETHEUS_MULTIPROC_DIR"


def api_server_count(argv: Sequence[str]) -> int:
    """The ``--api-server-count`` (either spelling, ``=`` or a separate value) in ``argv``; 1 if
    absent or unreadable (the argument parser reports a bad value later)."""
    count = "1"
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag.replace("_", "-") == "--api-server-count":
            count = value if eq else (argv[i + 1] if i + 1 < len(argv) else "1")
    try:
        return int(count)
    except ValueError:
        return 1


def prepare(argv: Sequence[str]) -> None:
    """Switch prometheus-client to multiprocess mode when ``argv`` asks for more than one API
    server process (call before ``prometheus_client`` is imported)."""
    if os.environ.get(ENV) or api_server_count(argv) <= 1:
        return
    directory = tempfile.mkdtemp(prefix="vlmserve-metrics-")
    os.environ[ENV] = directory
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a forked child
            shutil.rmtree(directory, ignore_errors=True)

    atexit.register(remove)


def enabled() -> bool:
    return bool(os.environ.get(ENV))
