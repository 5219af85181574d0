"""The real server as a subprocess for the server tests: ``python -m runtime`` on 127.0.0.1 with
free HTTP and gRPC ports, its output in a log file.

Public API:

* ``REPO`` -> the repository root (the server's cwd and PYTHONPATH).
* ``free_port()`` -> a free TCP port on 127.0.0.1.
* ``server_env(api_key=None, **extra)`` -> this process's environment without
  ``VLMSERVE_API_KEY`` (or with it set to ``api_key``), plus ``extra`` and PYTHONPATH=REPO.
* ``ServerProcess(model_dir, log_path, model_name, args, env)`` -> the started server:
  ``url``, ``port``, ``grpc_port``, ``wait_ready()`` (polls /v2/health/ready; ``saw_not_ready``
  tells whether it answered "not ready" meanwhile), ``tail()`` and ``stop()``. Test modules
  subclass it for their own command line and helpers.
* ``CliServer(model_dir, log_path, flags)`` -> ``vlmserve serve MODEL_DIR <flags>`` (the CLI entry
  point, as the guide's commands run it), fp32 on the CPU, without gRPC.
* ``post_and_hang_up(url, path, body, until, headers=None)``: a client that gives up on a
  non-streaming request once ``until()`` holds (e.g. the server counts it as running).
* ``running(server, make_offline=None)`` -> context manager for a module fixture: sets
  ``server.offline = make_offline()`` (the offline reference loads while the server starts),
  waits until the server is ready, yields it and stops it at the end.

Imported as a plain module (``tests/conftest.py`` puts this directory on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(api_key: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLMSERVE_API_KEY"}
    if api_key is not None:
        env["VLMSERVE_API_KEY"] = api_key
    env.update(extra)
    env["PYTHONPATH"] = str(REPO)
    return env


def post_and_hang_up(
    url: str, path: str, body: dict[str, Any], until: Callable[[], bool],
    headers: dict[str, str] | None = None, timeout: float = 10.0,
) -> None:
    """POST ``body`` as JSON on a raw connection, wait until ``until()`` holds, then close the
    connection without reading the answer: a client giving up at a moment the test controls, not
    after a client timeout that a fast enough engine could beat by finishing the request first."""
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as conn:
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError(f"post_and_hang_up: the condition did not hold within {timeout} s")
            time.sleep(0.02)


class ServerProcess:
    """``python -m runtime --model_name=<model_name> --model_dir=<model_dir>`` on 127.0.0.1 with
    free ports, then ``args``; ``wait_ready`` polls /v2/health/ready."""

    def __init__(
        self, model_dir: Path, log_path: Path, model_name: str, args: Sequence[str], env: dict[str, str]
    ) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "runtime", f"--model_name={model_name}", f"--model_dir={model_dir}",
               "--http_port", str(self.port), "--grpc_port", str(self.grpc_port), "--host", "127.0.0.1", *args]
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.saw_not_ready = False

    def tail(self) -> str:
        return self.log_path.read_text()[-4000:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                r = httpx.get(f"{self.url}/v2/health/ready", timeout=2)
                if r.status_code == 200:
                    return
                self.saw_not_ready = True
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


class CliServer(ServerProcess):
    """``vlmserve serve MODEL_DIR <flags>`` (the CLI entry point), fp32 on the CPU, no gRPC."""

    def __init__(self, model_dir: Path, log_path: Path, flags: Sequence[str]) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-c", "import sys; from runtime.cli import main; sys.exit(main())",
               "serve", str(model_dir), *flags, "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-grpc", "--dtype", "float32", "--device", "cpu"]
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(), stdout=self.log, stderr=subprocess.STDOUT)
        self.saw_not_ready = False


@contextlib.contextmanager
def running(server: ServerProcess, make_offline: Callable[[], Any] | None = None) -> Iterator[ServerProcess]:
    try:
        if make_offline is not None:
            server.offline = make_offline()
        server.wait_ready()
        yield server
    finally:
        server.stop()
