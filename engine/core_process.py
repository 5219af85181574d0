"""The engine core in its own process, as vLLM v1 and SGLang run it.

The child is a fresh interpreter (``python -m engine.core_process``) that connects back over a
local socket, rather than a multiprocessing spawn, so that callers' scripts need no
``if __name__ == "__main__"`` guard and nothing of the parent's state is re-imported.

The API process (HTTP, tokenisation, image preprocessing, detokenisation) and this process talk
over a pipe with small pickled messages, so a model step never waits on the event loop and the
event loop never waits on a model step. Both ends of the pipe have a thread of their own here, as
vLLM's engine core has: an input thread reads and unpickles every message as it arrives (a
request's image bytes are read at once, not between two steps, so the sender never waits for a
step to end), and an output thread pickles and writes each step's outputs while the next step
runs.

parent -> core: ("add", EngineRequest) | ("abort", [request_id]) | ("shutdown",)
More API processes may attach to a running core and share it (``engine.core_frontends``); each
gets the outputs of its own requests.
core -> parent: ("ready", info) | ("outputs", [EngineCoreOutput], EngineStats)
              | ("error", request_id, message)    the request was refused (bad input: a 400)
              | ("failed", request_id, message)   a step running it raised (an internal error: a 500)
              | ("fatal", message)
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from engine.core_frontends import HEAD, FrontEnds

logger = logging.getLogger(__name__)


def encode_msg(msg: Any) -> bytes:
    """Plain pickle: Connection.send's ForkingPickler would pass tensors as shared-memory handles,
    which the other process (not a multiprocessing child) cannot open. Copying the bytes is right."""
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def send_msg(conn: Connection, msg: Any) -> None:
    conn.send_bytes(encode_msg(msg))


def recv_msg(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def name_process(name: str) -> None:
    """Name this process by its role in ``ps``, ``top`` and py-spy (Linux's 15-character ``comm``),
    so that a profile or a CPU reading tells the engine core from an API server."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass  # a name is a convenience, never a reason to fail


def run_engine_core(engine_args: Any, conn: Connection, authkey: bytes | None = None) -> None:
    """Entry point of the core process: build the engine, then step while there is work. With
    ``authkey``, other front ends may attach (the ready message names the address)."""
    from engine.engine_core import EngineCore

    name_process("vlmserve-core")

    try:
        core = EngineCore(engine_args.create_engine_config())
    except Exception as exc:  # report start-up failures (bad model path, OOM) to the parent
        send_msg(conn, ("fatal", f"{type(exc).__name__}: {exc}"))
        return
    frontends = FrontEnds(conn)
    info: dict[str, Any] = {"num_blocks": core.block_manager.num_usable_blocks}
    if authkey is not None:
        frontends.listen(authkey, info)
        info = frontends.ready_info
    send_msg(conn, ("ready", info))
    serve_core(core, frontends)


def serve_core(core: Any, front: Connection | FrontEnds) -> None:
    """Serve the front end(s) until the head sends a shutdown or goes away: a reader thread per
    front end and an output thread around the step loop."""
    frontends = front if isinstance(front, FrontEnds) else FrontEnds(front)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    writer = threading.Thread(target=_write_output, args=(frontends, outbox), daemon=True, name="core-output")
    writer.start()
    try:
        _loop(core, frontends, outbox)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the parent went away
    except Exception as exc:
        # The traceback goes to this process's log; the parent (and its clients) get one line.
        logger.exception("engine core failed")
        outbox.put(("fatal", f"engine core failed: {type(exc).__name__}"))
    outbox.put(None)
    writer.join(timeout=10)


def _write_output(frontends: FrontEnds, outbox: queue.SimpleQueue) -> None:
    """Output thread: pickles and writes messages in order until a None; the head going away ends
    it (its reader then reports a shutdown too)."""
    while (msg := outbox.get()) is not None:
        try:
            frontends.deliver(msg)
        except (BrokenPipeError, OSError):
            return


# What the parent hears of a request that failed in the core; the traceback stays in this log.
REQUEST_FAILED = "the engine failed while running this request"


def _loop(core: Any, frontends: FrontEnds, outbox: queue.SimpleQueue) -> None:
    from engine.engine_core import StepError

    inbox = frontends.inbox
    while True:
        # Idle: block until the parent sends something. Busy: only take what is already there.
        msgs = [inbox.get()] if not core.has_unfinished() else []
        while True:
            try:
                msgs.append(inbox.get_nowait())
            except queue.Empty:
                break
        for sender, msg in msgs:
            kind = msg[0]
            if kind == "shutdown":
                if sender == HEAD:
                    return
                continue  # only the head stops the core
            if kind == "detach":  # a front end went away: nobody reads its requests any more
                core.abort_requests(frontends.detach(sender))
                continue
            if kind == "add":
                frontends.note_add(sender, msg[1].request_id)
                try:
                    core.add_request(msg[1])
                except ValueError as exc:
                    outbox.put(("error", msg[1].request_id, str(exc)))
                except Exception:  # a bug, not bad input: fail this request, keep serving
                    logger.exception("adding request %s failed", msg[1].request_id)
                    outbox.put(("failed", msg[1].request_id, REQUEST_FAILED))
            elif kind == "abort":
                core.abort_requests(msg[1])
        if core.has_unfinished():
            try:
                outputs = core.step()
            except StepError as exc:  # the step's requests are aborted; the others go on
                logger.error("engine step failed; failing its requests %s", exc.request_ids, exc_info=exc)
                for rid in exc.request_ids:
                    outbox.put(("failed", rid, REQUEST_FAILED))
                outputs = []
            outbox.put(("outputs", outputs, core.stats()))
        elif msgs:
            outbox.put(("outputs", [], core.stats()))


def start_core_process(engine_args: Any, timeout: float) -> tuple[subprocess.Popen, Connection, bytes]:
    """Start the core process and return it with a connection to it and the key other front ends
    attach with; the engine args travel over the authenticated socket, never on the command line."""
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
    return proc, conn, authkey


def _main() -> None:
    logging.basicConfig(level=os.environ.get("VLMSERVE_LOG_LEVEL", "INFO"))
    authkey = bytes.fromhex(os.environ.pop("VLMSERVE_CORE_AUTHKEY"))
    conn = Client(sys.argv[1], family="AF_UNIX", authkey=authkey)
    run_engine_core(recv_msg(conn), conn, authkey)


if __name__ == "__main__":
    _main()
