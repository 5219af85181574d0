"""More API server processes sharing one engine core (``--api-server-count N``, as vLLM's flag).

One Python process parses every request body, decodes every image and writes every streamed
token; on an H200 that process, not the engine, bounds what the server delivers (README,
"Serving at engine speed"). With N > 1 the server (the head) starts the engine core as usual
and, once its model is ready, N - 1 copies of itself that attach to that core
(``engine.core_frontends``) instead of starting their own. Every process binds the same HTTP and
gRPC ports with SO_REUSEPORT, so the kernel spreads connections over them; each serves its own
requests end to end. The head forwards SIGTERM to the others and waits for them before it stops
the engine; a copy that dies makes the head exit 1 (Kubernetes restarts the pod).

What is per process: ``/metrics`` (each answers its own counters; the engine gauges are the
core's) and readiness (a copy answers once its own engine client is warm).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time

from engine.async_llm import CoreAddress

logger = logging.getLogger("vlmserve.api_servers")

ATTACH_ENV = "VLMSERVE_CORE_ATTACH"  # "address authkey-hex": set for the copies by the head


def attach_address() -> CoreAddress | None:
    """The engine core this process attaches to, when the head started it as a copy."""
    value = os.environ.get(ATTACH_ENV)
    if not value:
        return None
    address, _, key = value.rpartition(" ")
    return CoreAddress(address, bytes.fromhex(key))


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) that other processes may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class APIServerCopies:
    """The head's N - 1 copies of itself: started once the engine core is up, stopped with it."""

    def __init__(self, count: int, command: list[str]) -> None:
        self.count = count
        self.command = command
        self.procs: list[subprocess.Popen] = []

    def start(self, core: CoreAddress) -> None:
        env = dict(os.environ, **{ATTACH_ENV: f"{core.address} {core.authkey.hex()}"})
        for rank in range(1, self.count):
            self.procs.append(subprocess.Popen(self.command, env=env))
            logger.info("API server %d started (pid %d)", rank, self.procs[-1].pid)

    def died(self) -> list[int]:
        """Exit codes of copies that ended."""
        return [p.returncode for p in self.procs if p.poll() is not None]

    def terminate(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        """Wait for the copies to finish their requests and exit; kill what is left after ``timeout``."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
