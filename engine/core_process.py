"""The engine core in its own process, as vLLM v1 and SGLang run it.

The child is a fresh interpreter (``python -m engine.core_process``) that connects back over a
local socket, rather than a multiprocessing spawn, so that callers' scripts need no
``if __name__ == "__main__"`` guard and nothing of the parent's state is re-imported.

The API process (HTTP, tokenisation, image preprocessing, detokenisation) and this process talk
over a pipe with small pickled messages, so a model step never waits on the event loop and the
event loop never waits on a model step.

parent -> core: ("add", EngineRequest) | ("abort", [request_id]) | ("shutdown",)
core -> parent: ("ready", info) | ("outputs", [EngineCoreOutput], EngineStats)
              | ("error", request_id, message)    the request was refused (bad input: a 400)
              | ("failed", request_id, message)   a step running it raised (an internal error: a 500)
              | ("fatal", message)
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

logger = logging.getLogger(__name__)


def send_msg(conn: Connection, msg: Any) -> None:
    """Plain pickle: Connection.send's ForkingPickler would pass tensors as shared-memory handles,
    which the other process (not a multiprocessing child) cannot open. Copying the bytes is right."""
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def recv_msg(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def run_engine_core(engine_args: Any, conn: Connection) -> None:
    """Entry point of the core process: build the engine, then step while there is work."""
    from engine.engine_core import EngineCore

    try:
        core = EngineCore(engine_args.create_engine_config())
    except Exception as exc:  # report start-up failures (bad model path, OOM) to the parent
        send_msg(conn, ("fatal", f"{type(exc).__name__}: {exc}"))
        return
    send_msg(conn, ("ready", {"num_blocks": core.block_manager.num_usable_blocks}))
    try:
        _loop(core, conn)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent went away
    except Exception as exc:
        # The traceback goes to this process's log; the parent (and its clients) get one line.
        logger.exception("engine core failed")
        try:
            send_msg(conn, ("fatal", f"engine core failed: {type(exc).__name__}"))
        except (BrokenPipeError, OSError):
            pass


# What the parent hears of a request that failed in the core; the traceback stays in this log.
REQUEST_FAILED = "the engine failed while running this request"


def _loop(core: Any, conn: Connection) -> None:
    from engine.engine_core import StepError

    while True:
        # Idle: block until the parent sends something. Busy: only drain what is already there.
        if not core.has_unfinished():
            conn.poll(None)
        changed = False
        while conn.poll(0):
            msg = recv_msg(conn)
            kind = msg[0]
            if kind == "shutdown":
                return
            changed = True
            if kind == "add":
                try:
                    core.add_request(msg[1])
                except ValueError as exc:
                    send_msg(conn, ("error", msg[1].request_id, str(exc)))
                except Exception:  # a bug, not bad input: fail this request, keep serving
                    logger.exception("adding request %s failed", msg[1].request_id)
                    send_msg(conn, ("failed", msg[1].request_id, REQUEST_FAILED))
            elif kind == "abort":
                core.abort_requests(msg[1])
        if core.has_unfinished():
            try:
                outputs = core.step()
            except StepError as exc:  # the step's requests are aborted; the others go on
                logger.error("engine step failed; failing its requests %s", exc.request_ids, exc_info=exc)
                for rid in exc.request_ids:
                    send_msg(conn, ("failed", rid, REQUEST_FAILED))
                outputs = []
            send_msg(conn, ("outputs", outputs, core.stats()))
        elif changed:
            send_msg(conn, ("outputs", [], core.stats()))


def start_core_process(engine_args: Any, timeout: float) -> tuple[subprocess.Popen, Connection]:
    """Start the core process and return it with a connection to it; the engine args travel over
    the authenticated socket, never on the command line."""
    authkey = os.urandom(32)
    listener = Listener(family="AF_UNIX", authkey=authkey)
    env = dict(os.environ, VLMSERVE_CORE_AUTHKEY=authkey.hex())
    # The child must import this very tree, whether or not the package is installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # A session of its own: Ctrl-C or a signal to the server's process group must not kill the core
    # under in-flight requests; the parent shuts it down, and it exits on EOF if the parent dies.
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.core_process", listener.address], env=env, start_new_session=True
    )
    listener._listener._socket.settimeout(timeout)  # accept() must not hang if the child dies early
    try:
        conn = listener.accept()
    except OSError as exc:
        proc.kill()
        raise RuntimeError(f"engine core process did not connect (exit code {proc.poll()})") from exc
    finally:
        listener.close()
    send_msg(conn, engine_args)
    return proc, conn


def _main() -> None:
    logging.basicConfig(level=os.environ.get("VLMSERVE_LOG_LEVEL", "INFO"))
    authkey = bytes.fromhex(os.environ.pop("VLMSERVE_CORE_AUTHKEY"))
    conn = Client(sys.argv[1], family="AF_UNIX", authkey=authkey)
    run_engine_core(recv_msg(conn), conn)


if __name__ == "__main__":
    _main()
